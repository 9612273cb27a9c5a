"""Backups of a running fit, enough to continue it exactly: :func:`cnn.train.fit`'s
``backup_dir=`` and ``backup_every=``, ``train --backup-dir DIR --backup-every N{steps|epochs}``.

What a backup holds, when it is written and how a fit continues from it: ``docs/backups.md``.
In short, a backup is one ``.npz`` file in the backup folder, ``backup-<seq>.npz`` (``seq``
counts the backups of the folder, 8 digits), written atomically (:func:`cnn.files.atomic_write`:
a temporary file, fsync, rename, fsync of the folder), holding

- ``__meta__``: JSON (UTF-8 bytes as a ``uint8`` array): the format and its version, what
  identifies the run (the model's spec and dtype, fingerprints of the training and validation
  data, the batch size, seed, shuffle, the optimizer with its resolved schedule, the
  strategy's algorithm), where the run stands (epoch, batches done in it, the global step,
  the sums of the epoch so far), the history so far, the schedule's and the callbacks' state,
  and the strategy's own state; arrays inside it are references ``{"__array__": NAME}``;
- ``__integrity__``: JSON with the SHA-256 of ``__meta__`` and of every array (name, dtype,
  shape and bytes, in name order), checked before anything is used;
- the arrays: ``param/<key>``, ``buffer/<key>``, ``slot/<slot>/<key>`` (the optimizer's
  state), and those the meta references (``strategy/...``, ``callback/<i>/...``).

The folder keeps the newest :data:`KEEP` backups. :meth:`FitBackups.load` takes the newest that
reads back whole and matches its integrity record, saying so; a torn or damaged newer one is
renamed ``*.damaged`` (kept for inspection) and the fit falls back to the one before it,
saying that too. :func:`check_identity` refuses a backup of another run, naming what differs.

This module knows files and formats; :mod:`cnn.train` decides what goes into a backup and
continues from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .checks import is_integer
from .files import atomic_write, fsync_dir, remove_stale_temporaries

FORMAT = "parallel-cnn fit backup"
VERSION = 1
#: backups a folder keeps (the newest; an older one is the fall-back when the newest is torn)
KEEP = 2
META, INTEGRITY = "__meta__", "__integrity__"
_NAME = re.compile(r"^backup-(\d{8,})\.npz$")
_EVERY = re.compile(r"^\s*(\d+)\s*(steps?|epochs?)\s*$")


class BackupError(ValueError):
    """A backup file that cannot be used: torn, damaged, or not a backup of this format."""


class BackupMismatchError(ValueError):
    """The backup folder holds another run's backups (the message names what differs)."""


# ---- the frequency ---------------------------------------------------------------------------
def parse_every(every: Any) -> tuple[int, str]:
    """``(count, unit)`` of a backup frequency, ``unit`` ``"step"`` or ``"epoch"``:
    ``"epoch"`` (after every epoch), ``"N epochs"``/``"Nepochs"``, ``"N steps"``/``"Nsteps"``,
    or a positive integer N (steps, as Keras's ``save_freq``). ``ValueError`` naming the value
    otherwise."""
    if isinstance(every, str):
        if every.strip() in ("epoch", "epochs"):
            return 1, "epoch"
        m = _EVERY.match(every)
        if m and int(m.group(1)) >= 1:
            return int(m.group(1)), m.group(2).rstrip("s")
    elif is_integer(every) and not isinstance(every, bool) and every >= 1:
        return int(every), "step"
    raise ValueError(f"backup_every must be 'epoch', 'N epochs', 'N steps' or a positive number "
                     f"of steps (e.g. '100steps', '2epochs'). Received backup_every={every!r}")


# ---- what identifies a run ---------------------------------------------------------------------
def fingerprint(x, y) -> dict:
    """What identifies a data set without storing it: the number of examples, their shape and
    dtype, and CRC-32s of the inputs' bytes and of the labels (as int64)."""
    x = np.asarray(x)
    crc = 0
    rows = max(1, (1 << 24) // max(1, x[:1].nbytes))  # 16 MiB at a time: no copy of the whole
    for i in range(0, len(x), rows):
        crc = zlib.crc32(np.ascontiguousarray(x[i:i + rows]).reshape(-1).view(np.uint8), crc)
    labels = np.ascontiguousarray(np.asarray(y, dtype=np.int64))
    return {"examples": int(len(x)), "shape": list(x.shape[1:]), "dtype": str(x.dtype),
            "crc32": f"{crc:08x}", "labels_crc32": f"{zlib.crc32(labels.view(np.uint8)):08x}"}


def differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """``where: <saved> in the backup, <current> now`` for every leaf that differs between two
    JSON-like values (dicts by key, lists by position)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in list(saved) + [k for k in current if k not in saved]:
            sub = f"{where}.{k}" if where else str(k)
            if k not in current:
                out.append(f"{sub}: {_short(saved[k])} in the backup, absent now")
            elif k not in saved:
                out.append(f"{sub}: absent in the backup, {_short(current[k])} now")
            else:
                out += differences(saved[k], current[k], sub)
        return out
    if isinstance(saved, list) and isinstance(current, list):
        if len(saved) != len(current):
            return [f"{where}: {len(saved)} entries in the backup, {len(current)} now"]
        out = []
        for i, (a, b) in enumerate(zip(saved, current)):
            out += differences(a, b, f"{where}[{i}]")
        return out
    return [] if saved == current else [f"{where}: {_short(saved)} in the backup, "
                                        f"{_short(current)} now"]


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def check_identity(path: Path, saved: dict, current: dict) -> None:
    """Raise :class:`BackupMismatchError` naming the backup and what differs when ``saved``
    (its identity) is not ``current`` (this fit's)."""
    diff = differences(saved, current)
    if diff:
        shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5 else "")
        raise BackupMismatchError(
            f"{path} is a backup of another run: {shown}. Continue that run with its own "
            f"settings, or give another backup folder (or empty this one) to start afresh")


# ---- arrays inside plain values ------------------------------------------------------------------
def pack(tree: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """``tree`` with every NumPy array moved into ``arrays`` (under ``prefix/<path>``) and
    replaced by ``{"__array__": name}``; NumPy scalars become Python numbers."""
    if isinstance(tree, np.ndarray):
        arrays[prefix] = tree
        return {"__array__": prefix}
    if isinstance(tree, dict):
        return {str(k): pack(v, f"{prefix}/{k}", arrays) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [pack(v, f"{prefix}/{i}", arrays) for i, v in enumerate(tree)]
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def unpack(tree: Any, arrays: dict[str, np.ndarray] | None) -> Any:
    """The inverse of :func:`pack`; with ``arrays`` None, every array is None (what a process
    that did not read the file gets)."""
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return None if arrays is None else arrays[tree["__array__"]]
        return {k: unpack(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, arrays) for v in tree]
    return tree


# ---- one file --------------------------------------------------------------------------------
def _digest(meta: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta)
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()


def backup_name(seq: int) -> str:
    return f"backup-{seq:08d}.npz"


def write_backup(path: Path, meta: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write one backup file atomically (see the module docstring)."""
    text = json.dumps({"format": FORMAT, "version": VERSION, **meta}).encode()
    record = json.dumps({"format": FORMAT, "version": VERSION,
                         "sha256": _digest(text, arrays)}).encode()
    members = {META: np.frombuffer(text, np.uint8), INTEGRITY: np.frombuffer(record, np.uint8),
               **arrays}
    return atomic_write(path, lambda f: np.savez(f, **members))


class Backup:
    """A backup read back whole and checked: ``path``, ``seq``, ``meta`` (the JSON, arrays as
    references) and ``arrays`` (name -> array)."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.ndarray]):
        self.path, self.meta, self.arrays = Path(path), meta, arrays
        self.seq = int(meta.get("seq", 0))

    def value(self, key: str) -> Any:
        """``meta[key]`` with its array references resolved."""
        return unpack(self.meta.get(key), self.arrays)

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """``{key: array}`` of the arrays named ``prefix/<key>``."""
        n = len(prefix) + 1
        return {k[n:]: v for k, v in self.arrays.items() if k.startswith(prefix + "/")}


def read_backup(path: str | os.PathLike) -> Backup:
    """The backup at ``path``, checked against its integrity record; :class:`BackupError`
    naming the file and the reason when it is torn, damaged, or not a backup of this format."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
        size = path.stat().st_size
        # written stored (np.savez): a member larger than the file is not one of ours, and
        # nothing is decompressed into memory beyond the file's own size
        if any(i.compress_type != zipfile.ZIP_STORED or i.file_size > size for i in infos):
            raise BackupError(f"{path}: not a backup written by fit (compressed members)")
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except BackupError:
        raise
    except Exception as err:  # noqa: BLE001 - zipfile, zlib and the .npy reader raise many kinds
        raise BackupError(f"{path}: cannot be read ({type(err).__name__}: {err}); it was cut "
                          f"short while being written, or damaged") from None
    text, record = arrays.pop(META, None), arrays.pop(INTEGRITY, None)
    if text is None or record is None:
        raise BackupError(f"{path}: not a backup written by fit (no {META} or {INTEGRITY})")
    try:
        record = json.loads(record.tobytes())
        meta = json.loads(text.tobytes())
    except ValueError as err:
        raise BackupError(f"{path}: its record cannot be read ({err})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise BackupError(f"{path}: not a backup written by fit (format "
                          f"{record.get('format') if isinstance(record, dict) else record!r})")
    if int(record.get("version", 0)) > VERSION:
        raise BackupError(f"{path}: written by a newer version (format version "
                          f"{record['version']}; this one reads {VERSION}); update the package")
    if record.get("sha256") != _digest(text.tobytes(), arrays):
        raise BackupError(f"{path}: its contents do not match its integrity record (damaged "
                          f"after it was written)")
    return Backup(path, meta, arrays)


def backup_files(folder: Path) -> list[tuple[int, Path]]:
    """``(seq, path)`` of the backups in ``folder``, newest first."""
    out = []
    for p in folder.iterdir() if folder.is_dir() else ():
        m = _NAME.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def check_backup_dir(folder: str | os.PathLike) -> Path:
    """The backup folder, created if missing and checked writable (a probe file written and
    removed) before any training; ``OSError``/``NotADirectoryError`` naming it otherwise."""
    folder = Path(os.fspath(folder))
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"backup folder {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise type(exc)(f"cannot write backups into {folder}: {exc.strerror or exc}") from None
    return folder


class FitBackups:
    """The backups of one fit: the folder, when they are due, reading the newest, writing,
    keeping the last :data:`KEEP`.

    Args:
        folder: the backup folder (created; checked writable now, before any training).
        every: how often (:func:`parse_every`).
        master: whether this process reads and writes the files (MPI: rank 0 alone).
        say: where messages go (default: standard error).
    """

    def __init__(self, folder: str | os.PathLike, every: Any = "epoch", *, master: bool = True,
                 say: Callable[[str], None] | None = None):
        self.count, self.unit = parse_every(every)
        self.master = master
        self.folder = check_backup_dir(folder) if master else Path(os.fspath(folder))
        self.say = say or (lambda message: print(message, file=sys.stderr, flush=True))
        self.seq = 0
        self.written: list[Path] = []
        self._failures: set[str] = set()
        if master:  # temporaries of a backup whose writer was killed (kill -9) mid-write
            remove_stale_temporaries(self.folder, "backup-*.npz")
            existing = backup_files(self.folder)
            self.seq = existing[0][0] if existing else 0

    def describe(self) -> str:
        return f"every {self.count} {self.unit}{'s' if self.count > 1 else ''} into {self.folder}"

    def due_after_step(self, global_step: int) -> bool:
        return self.unit == "step" and global_step % self.count == 0

    def due_after_epoch(self, epoch: int) -> bool:
        return self.unit == "epoch" and epoch % self.count == 0

    def load(self) -> Backup | None:
        """The newest usable backup of the folder (None when it has none), falling back past
        torn or damaged ones, each renamed ``*.damaged`` and named in a message."""
        for seq, path in backup_files(self.folder):
            try:
                backup = read_backup(path)
            except BackupError as err:
                damaged = path.with_name(path.name + ".damaged")
                os.replace(path, damaged)
                self.say(f"backup: {err}; falling back to an older backup (the file is kept "
                         f"as {damaged.name})")
                continue
            return backup
        return None

    def write(self, meta: dict, arrays: dict[str, np.ndarray]) -> Path | None:
        """Write the next backup and remove those beyond the newest :data:`KEEP`. A failure
        (a full disk) warns, once per kind of error, and training goes on: the older backups
        stay. Returns the path written (None on failure, or on a process that does not
        write)."""
        if not self.master:
            return None
        path = self.folder / backup_name(self.seq + 1)
        try:
            write_backup(path, {**meta, "seq": self.seq + 1}, arrays)
        except OSError as err:
            key = f"{type(err).__name__}{getattr(err, 'errno', '')}"
            if key not in self._failures:
                self._failures.add(key)
                warnings.warn(f"backup not written: {err}; training goes on, and the older "
                              f"backups in {self.folder} stay", RuntimeWarning, stacklevel=3)
            return None
        self.seq += 1
        self.written.append(path)
        for _, old in backup_files(self.folder)[KEEP:]:
            old.unlink(missing_ok=True)
        return path

    def remove_all(self) -> None:
        """Delete the folder's backups (after a fit that finished: nothing is left to resume,
        as Keras's ``BackupAndRestore`` deletes its own)."""
        if not self.master:
            return
        for _, path in backup_files(self.folder):
            path.unlink(missing_ok=True)
        fsync_dir(self.folder)
