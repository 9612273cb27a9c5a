"""Records of classes that live in modules imported on first use.

The registries of backends (:mod:`cnn.backends.registry`) and of strategies (:mod:`cnn.paths`)
hold one record per name, saying which module defines the class; the module is imported when
the class is first asked for (:meth:`ClassRecord.load`), so an optional dependency (Numba, a
GPU, mpi4py) is imported only by the code that uses it, and code that decides on a record's
facts never imports it. Both registries add records one way (:func:`add_record`).

Importing this module imports the standard library only.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class ClassRecord:
    """Where a class lives.

    Attributes:
        module: the module that defines it, imported by :meth:`load`.
        cls: the class's name in ``module``.
    """

    module: str = ""
    cls: str = ""

    def load(self) -> type:
        """The class (its module imported now, if it was not)."""
        return getattr(importlib.import_module(self.module), self.cls)


def add_record(table: dict, kind: str, name: str, record: ClassRecord,
               record_type: type = ClassRecord) -> ClassRecord:
    """``table[name] = record`` for a registry of ``kind`` (``"backend"``, ``"strategy"``):
    ``TypeError`` when ``record`` is not a ``record_type``, ``ValueError`` when ``name`` is not
    a non-empty string or is taken, or the record names no module and class."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind}'s name is a non-empty string; received name={name!r}")
    if not isinstance(record, record_type):
        raise TypeError(f"a {kind}'s record is a {record_type.__name__}; received "
                        f"{type(record).__name__}")
    if name in table:
        raise ValueError(f"{kind} {name!r} is already registered")
    if not (record.module and record.cls):
        raise ValueError(f"{kind} {name!r}: its record names the module and class that define "
                         f"it; received module={record.module!r}, cls={record.cls!r}")
    table[name] = record
    return record
