"""The ``study`` command: ``python -m cnn study`` (and ``python -m cnn.study``)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterable

from ..checks import int_arg, number_arg
from ..results import (CALIBRATION_RESULTS, DEFAULT_RESULTS, QUICK_RESULTS, StudyLockedError,
                       load_results)
from .estimate import describe_plan
from .grid import read_grid
from .profiles import PROFILES
from .runner import run_study


_nonnegative_seconds = number_arg(low=0.0)


def _wait_seconds(text: str) -> float | None:
    """``--wait``: seconds >= 0, or ``inf``/``forever`` (None: wait as long as it takes)."""
    if text in ("inf", "forever"):
        return None
    try:
        return _nonnegative_seconds(text)
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{err} (or 'forever')") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``study`` command's options (shared by ``python -m cnn study`` and this module)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--profile", default="quick", choices=sorted(PROFILES),
                   help="named grid (default quick: offline, a few minutes)")
    g.add_argument("--grid", default=None, help="a grid as a .json or .yaml file instead")
    p.add_argument("--data-dir", default=None,
                   help="data root with mnist/ and cifar-10-batches-py/ (default $CNN_DATA_DIR)")
    p.add_argument("--out", default=str(DEFAULT_RESULTS),
                   help="results pickle (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate")
    p.add_argument("--calibrate", default=None,
                   help="results pickle whose measurements refine the --dry-run estimate "
                        f"(default: every one of --out, {DEFAULT_RESULTS}, "
                        f"{CALIBRATION_RESULTS} and {QUICK_RESULTS} that exists)")
    p.add_argument("--timeout", type=number_arg(low=0.0, low_open=True), default=None,
                   help="per-run timeout in seconds (positive)")
    p.add_argument("--wait", type=_wait_seconds, default=0.0,
                   help="when another study is writing --out, wait this many seconds (or "
                        "'forever') for it instead of refusing at once")
    p.add_argument("--order-seed", type=int_arg(low=None), default=0,
                   help="seed of the randomised run order within each repeat block (recorded "
                        "per run; default 0)")
    p.add_argument("--no-retry-failed", action="store_true", help="skip runs recorded as failed")
    p.add_argument("--no-download", action="store_true", help="never download data sets")


def command(args) -> int:
    """Run the ``study`` command from parsed arguments."""
    grid = read_grid(args.grid) if args.grid else args.profile
    if args.dry_run:
        paths = ([args.calibrate] if args.calibrate else
                 list(dict.fromkeys(str(p) for p in (args.out, DEFAULT_RESULTS,
                                                      CALIBRATION_RESULTS, QUICK_RESULTS)
                                    if Path(p).is_file())))
        calibration = None
        if paths:
            import pandas as pd
            frames = [load_results(p) for p in paths]
            # a run measured in two files counts once, from the first
            seen: set = set()
            kept = []
            for frame in frames:
                kept.append(frame[~frame["run_key"].isin(seen)])
                seen |= set(frame["run_key"])
            calibration = pd.concat(kept, ignore_index=True)
        print(describe_plan(grid, calibration, out=args.out))
        if paths:
            print(f"(estimate calibrated on {', '.join(paths)})")
        return 0
    import signal

    def _terminate(signum, frame):  # a kill ends the child too, like Ctrl-C
        raise KeyboardInterrupt
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    t = time.perf_counter()
    try:
        run_study(grid, out=args.out, data_root=args.data_dir, progress=True,
                  retry_failed=not args.no_retry_failed, download=not args.no_download,
                  timeout=args.timeout, wait=args.wait, order_seed=args.order_seed)
    except StudyLockedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: every finished run is kept in {args.out}; run the same command "
              f"again to resume", file=sys.stderr)
        return 130
    print(f"study wall time {time.perf_counter() - t:.0f} s")
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cnn.study", description="run the study")
    add_arguments(p)
    args = p.parse_args(None if argv is None else list(argv))
    try:
        return command(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
