"""Structured files, read and written one way everywhere: JSON/YAML text read with errors that
name the file and the line (and the inline form of an option, :func:`parse_inline`), and atomic
writes (a temporary file beside the target, fsync,
rename, fsync of the folder), so a crash, a kill or a full disk leaves the old file or the new
one, never half of one, and no temporary file behind.

Named ``files`` rather than ``io`` so that it never reads as the standard library's module.
"""
from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import secrets
import tempfile
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
            return json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise _unreadable(path, exc.msg, "JSON", exc.lineno, exc.colno) from None
        except _DuplicateKey as exc:
            raise _unreadable(path, str(exc), "JSON") from None
        except RecursionError:
            raise _unreadable(path, "nested too deeply", "JSON") from None
    import yaml
    try:
        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise _unreadable(path, problem, "YAML",
                          *((mark.line + 1, mark.column + 1) if mark else ())) from None
    except RecursionError:
        raise _unreadable(path, "nested too deeply", "YAML") from None


#: values a YAML document may expand to through its aliases (``*a`` repeats what ``&a``
#: names): far beyond any spec, config or grid, far below what exhausts memory when the value
#: is printed or copied (a few hundred bytes of nested aliases expand to billions)
MAX_YAML_VALUES = 1_000_000


def parse_inline(text: str, option: str, form: str = "key=value,...",
                 whole: str | None = None) -> dict:
    """The dict of an option's inline text: a JSON object (``{"pad": 4}``) or
    ``key=value,key=value`` with the values read as YAML scalars (``0.1``, ``2``, ``true``,
    ``epoch``). ``ValueError`` naming ``option``, the ``form`` it expects and the option's
    ``whole`` text (default ``text``) when it is neither."""
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{option}: not a JSON object ({err.msg} at column {err.colno}). "
                             f"Received {text!r}") from None
    import yaml
    spec: dict[str, Any] = {}
    for item in text.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{option}: expected {form}; {item!r} has no key=value. "
                             f"Received {whole or text!r}")
        try:
            spec[key.strip()] = yaml.safe_load(value.strip())
        except yaml.YAMLError:
            spec[key.strip()] = value.strip()
    return spec


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """A JSON object's dict, refusing a key given twice (the parser would keep the last)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r} (only its last value would be kept)")
        out[key] = value
    return out


@functools.lru_cache(maxsize=1)
def _yaml_loader():
    """``yaml.SafeLoader`` that refuses a mapping key given twice (PyYAML keeps the last one
    silently) and a document that expands, through aliases, to more than
    :data:`MAX_YAML_VALUES` values (a "billion laughs"), or that refers to itself."""
    import yaml
    from yaml.constructor import ConstructorError
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode

    def expanded(node, sizes: dict, open_: set) -> int:
        """Values under ``node`` with every alias expanded, each shared node counted once
        per use (memoised, so a bomb is measured without being built)."""
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise ConstructorError(None, None, "the document refers to itself through an "
                                   "alias (a recursive structure)", node.start_mark)
        open_.add(id(node))
        if isinstance(node, SequenceNode):
            children = node.value
        elif isinstance(node, MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        total = 1
        for child in children:
            total += expanded(child, sizes, open_)
            if total > MAX_YAML_VALUES:
                raise ConstructorError(None, None, f"the document expands through its aliases "
                                       f"to more than {MAX_YAML_VALUES:,} values (nested "
                                       f"aliases: a 'billion laughs')", node.start_mark)
        open_.discard(id(node))
        sizes[id(node)] = total
        return total

    class Loader(yaml.SafeLoader):
        def get_single_data(self):
            node = self.get_single_node()
            if node is None:
                return None
            expanded(node, {}, set())
            return self.construct_document(node)

        def construct_mapping(self, node, deep=False):
            if isinstance(node, MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge" or \
                            not isinstance(key_node, ScalarNode):
                        continue
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise ConstructorError("while reading a mapping", node.start_mark,
                                               f"duplicate key {key_node.value!r} (only its "
                                               f"last value would be kept)",
                                               key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


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


#: a temporary file of :func:`atomic_write`: ``.<target name>.<pid>.<8 hex digits>.tmp``
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temporaries(folder: str | os.PathLike, target: str = "*") -> list[Path]:
    """Remove the temporary files that :func:`atomic_write` calls in ``folder`` left for
    targets matching the glob ``target`` when their writer was killed mid-write (``kill -9``
    leaves no chance to clean up): those whose process is gone. A live writer's are kept.
    Returns the files removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMPORARY.match(entry.name)
        if (m and fnmatch.fnmatchcase(m.group("name"), target)
                and int(m.group("pid")) != os.getpid() and not process_alive(int(m.group("pid")))):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike,
                 content: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``content`` (bytes, text as UTF-8, or a function that writes to a binary file) to
    ``path`` atomically and durably; returns ``path``.

    The temporary file has a unique name beside the target (same file system, so the rename
    is atomic) and the usual permissions (``0o666`` less the umask). Any failure, an interrupt
    included, removes it; an ``OSError`` names ``path``, not the temporary file. Temporaries
    of earlier writes of the same target whose writer was killed are removed first
    (:func:`remove_stale_temporaries`). A symbolic link is written through: the file it points
    to is replaced and the link stays a link."""
    path = Path(path)
    target = Path(os.path.realpath(path)) if _has_link(path) else path
    remove_stale_temporaries(target.parent, target.name)
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
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
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        message = f"cannot write {path}: {exc.strerror or exc}"
        raise (type(exc)(message) if exc.errno is None
               else type(exc)(exc.errno, message)) from None
    fsync_dir(target.parent)
    return path


def make_folders(folder: str | os.PathLike) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders created, deepest first.
    ``NotADirectoryError`` naming the file in the way when an ancestor is a file."""
    folder = Path(folder)
    missing = []
    current = folder
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    if not current.is_dir():
        raise NotADirectoryError(f"cannot write under {folder}: {current} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def check_writable(path: str | os.PathLike, what: str = "the file") -> Path:
    """Check, before any work is done, that ``path`` can be written (as :func:`atomic_write`
    writes it): its folder exists or can be made, a file can be created in it, and an existing
    ``path`` is writable. Returns ``path``; ``OSError`` naming it and the reason otherwise.
    Leaves nothing behind: the probe file and any folders made for it are removed."""
    target = Path(path)
    try:
        created = make_folders(target.parent)
    except NotADirectoryError:
        raise
    except OSError as exc:
        raise type(exc)(f"cannot create the folder for {target}: "
                        f"{exc.strerror or exc}") from None
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(name)
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError("the file exists and is read-only")
    except OSError as exc:
        raise type(exc)(f"cannot write {what} to {target}: {exc.strerror or exc}") from None
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
    return target


def _has_link(path: Path) -> bool:
    """Whether ``path`` or one of its folders is a symbolic link."""
    return any(p.is_symlink() for p in (path, *path.parents))
