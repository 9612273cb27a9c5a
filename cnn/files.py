"""Structured files, read and written one way everywhere: JSON/YAML text read with errors that
name the file and the line, and atomic writes (a temporary file beside the target, fsync,
rename, fsync of the folder), so a crash, a kill or a full disk leaves the old file or the new
one, never half of one, and no temporary file behind.

Named ``files`` rather than ``io`` so that it never reads as the standard library's module.
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

#: the suffixes :func:`read_structured` understands
STRUCTURED_SUFFIXES = (".json", ".yaml", ".yml")


class StructuredFileError(ValueError):
    """A file :func:`read_structured` cannot read as what its suffix says.

    Attributes: ``path``; ``kind`` (``"JSON"`` or ``"YAML"``; None when the bytes cannot be
    read as text at all); ``problem`` (what the parser says); ``line`` and ``column`` (1-based,
    None when the parser does not say). ``where`` is `` at line L, column C`` (or empty), so a
    caller that words the error its own way still names the place. Constructed from a message
    alone (``type(err)(f"--config: {err}")``) it keeps only the message.
    """

    path: Path | None = None
    problem = ""
    kind: str | None = None
    line: int | None = None
    column: int | None = None

    @property
    def where(self) -> str:
        return f" at line {self.line}, column {self.column}" if self.line is not None else ""


def _unreadable(path: Path, problem: str, kind: str | None = None, line: int | None = None,
                column: int | None = None) -> StructuredFileError:
    """The error for ``path``: ``<path>: not valid <kind>: <problem> at line L, column C``."""
    err = StructuredFileError()
    err.path, err.problem, err.kind, err.line, err.column = path, problem, kind, line, column
    err.args = (f"{path}: not valid {kind}: {problem}{err.where}" if kind
                else f"{path}: {problem}",)
    return err


def read_structured(path: str | os.PathLike, what: str = "file") -> Any:
    """The value in a ``.json``/``.yaml``/``.yml`` file (YAML: ``safe_load``, no objects).

    ``FileNotFoundError`` naming ``what`` and the path when there is no such file;
    :class:`StructuredFileError` (a ``ValueError``) naming the file (and the line and column)
    when it cannot be read, is not UTF-8, is not valid text of its kind, or is nested too
    deeply to parse."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}"
                                + (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _unreadable(path, f"not a text file (not UTF-8: {exc.reason} at byte "
                                f"{exc.start})") from None
    except OSError as exc:
        raise _unreadable(path, f"cannot be read ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise _unreadable(path, exc.msg, "JSON", exc.lineno, exc.colno) from None
        except RecursionError:
            raise _unreadable(path, "nested too deeply", "JSON") from None
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _unreadable(path, problem, "YAML",
                          *((mark.line + 1, mark.column + 1) if mark else ())) from None
    except RecursionError:
        raise _unreadable(path, "nested too deeply", "YAML") from None


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (where the platform allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike,
                 content: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` (bytes, text as UTF-8, or a function that writes to a binary file) to
    ``path`` atomically and durably; returns ``path``.

    The temporary file has a unique name beside the target (same file system, so the rename
    is atomic) and the usual permissions (``0o666`` less the umask). Any failure, an interrupt
    included, removes it; an ``OSError`` names ``path``, not the temporary file."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with open(fd, "wb") as f:
                if callable(content):
                    content(f)
                else:
                    f.write(content.encode("utf-8") if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        message = f"cannot write {path}: {exc.strerror or exc}"
        raise (type(exc)(message) if exc.errno is None
               else type(exc)(exc.errno, message)) from None
    fsync_dir(path.parent)
    return path
