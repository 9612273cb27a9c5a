"""Comparing two training paths: how far one path's arrays (parameters, gradients, logits) are
from another's, in units of the reference's scale. The equivalence tests and notebooks bound
these numbers, whichever two paths they compare (ours against Keras or PyTorch, threads, MPI
ranks or the GPU against the sequential path).
"""
from __future__ import annotations

import numpy as np


def relative_difference(actual, reference) -> float:
    """``max |actual - reference| / max |reference|``: the difference in units of the array's
    scale (0 when both are zero). The tests and notebooks bound this number."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {r.shape}")
    scale = float(np.abs(r).max()) if r.size else 0.0
    diff = float(np.abs(a - r).max()) if r.size else 0.0
    return diff / scale if scale else diff


def diff_table(actual: dict, reference: dict):
    """One row per key of two dicts of arrays (parameters, gradients, logits): shape,
    ``max_abs_ref`` = max |reference|, ``max_abs_diff`` = max |actual - reference| and
    ``rel_diff`` (see :func:`relative_difference`). A pandas DataFrame indexed by key."""
    import pandas as pd
    if actual.keys() != reference.keys():
        raise ValueError(f"keys differ: {sorted(actual)} vs {sorted(reference)}")
    rows = []
    for k in reference:
        a = np.asarray(actual[k], dtype=np.float64)
        r = np.asarray(reference[k], dtype=np.float64)
        rows.append({"key": k, "shape": tuple(r.shape), "max_abs_ref": float(np.abs(r).max()),
                     "max_abs_diff": float(np.abs(a - r).max()),
                     "rel_diff": relative_difference(a, r)})
    return pd.DataFrame(rows).set_index("key")
