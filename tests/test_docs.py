"""The design documents (``docs/*.md``) and the README's layout name only what exists, so they
cannot silently go stale when code moves or is renamed:

- every repository path they name in backticks, in a link or in a file tree is a file or
  folder of the repository, and every link's ``#anchor`` is a heading of the linked page;
- every ``cnn.`` name in backticks resolves: its module exists and, for a name inside one, the
  module imported, every attribute is found (``cnn.parallel.sync.SyncCore.worker_step``);
- the module tree of ``docs/architecture.md`` lists every module and subpackage of ``cnn/``
  (and every one inside the subpackages whose contents it lists).

The picture of the package's layers is checked against the layering the imports follow in
``tests/test_architecture.py``.
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"
#: the top-level entries of the repository a path may start with
TOP = ("cnn", "tests", "docs", "scripts", "notebooks", "results", "report", ".ci", "README.md",
       "Makefile", "requirements.txt", "requirements-bench.txt", "pyproject.toml", "pytest.ini")

SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
NAME = re.compile(r"\bcnn(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"^[\w.\-]+(?:/[\w.\-]*)*$")
BLOCK = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def repo_path(text: str) -> Path | None:
    """The repository path ``text`` names (``cnn/paths.py``, ``docs/``, ``Makefile``), or None
    when it names none (a command, a value, a path outside the repository)."""
    if not PATH.match(text) or text.split("/")[0] not in TOP:
        return None
    return ROOT / text


def resolve(name: str):
    """The object ``cnn.a.b.C.d`` names: the longest prefix that is a module of the package,
    then attributes. A name that is a module is only checked to exist (nothing imported)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            if i == len(parts):
                return base
            obj = importlib.import_module(".".join(parts[:i]))
            for attr in parts[i:]:
                obj = getattr(obj, attr)  # AttributeError names what is missing
            return obj
    raise ModuleNotFoundError(f"no module for {name}")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of ``page``."""
    out = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            heading = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", heading).replace(" ", "-"))
    return out


def prose(text: str) -> str:
    """``text`` without its fenced code blocks (pictures and trees are checked on their own)."""
    return BLOCK.sub("", text)


# ---- the checks, one test per document ----------------------------------------------------------
@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_path_named_in_backticks_exists(page):
    missing = [span for span in SPAN.findall(prose(page.read_text(encoding="utf-8")))
               if (path := repo_path(span)) is not None and not path.exists()]
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_link_leads_to_a_file_and_heading(page):
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{page.name} links to what does not exist: {broken}"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_cnn_name_in_backticks_resolves(page):
    names = sorted({n for span in SPAN.findall(prose(page.read_text(encoding="utf-8")))
                    for n in NAME.findall(span)})
    unresolved = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as err:
            unresolved.append(f"{name} ({err})")
    assert not unresolved, f"{page.name} names what does not exist: {unresolved}"


# ---- the module tree of docs/architecture.md ----------------------------------------------------
TREE_ENTRY = re.compile(r"^( {0,8})([A-Za-z_][\w.]*(?:\.py|/))(?: {2,}|$)")


def tree_entries(block: str) -> dict[Path, list[Path]]:
    """``{folder: [entries listed under it]}`` of a file tree drawn with two spaces per level
    (a name, then its description after two spaces or more; deeper lines continue a
    description)."""
    listed: dict[Path, list[Path]] = {}
    stack: list[Path] = []
    for line in block.splitlines():
        m = TREE_ENTRY.match(line)
        if not m or len(m.group(1)) % 2:
            continue
        depth = len(m.group(1)) // 2
        parent = stack[depth - 1] if depth else ROOT
        path = parent / m.group(2).rstrip("/")
        listed.setdefault(parent, []).append(path)
        del stack[depth:]
        stack.append(path)
    return listed


def module_tree() -> dict[Path, list[Path]]:
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = next(b for b in BLOCK.findall(text) if b.startswith("cnn/"))
    return tree_entries(block)


def test_the_module_tree_names_what_exists():
    missing = [str(p.relative_to(ROOT)) for entries in module_tree().values() for p in entries
               if not p.exists()]
    assert not missing, f"docs/architecture.md lists what does not exist: {missing}"


def test_the_module_tree_lists_every_module():
    """Every module and subpackage of ``cnn/``, and of every subpackage whose contents the tree
    lists, has its line (``__init__.py`` files aside, but for the package's own)."""
    tree = module_tree()
    unlisted = []
    for folder, entries in tree.items():
        if folder == ROOT:
            continue
        present = {p for p in folder.iterdir()
                   if (p.suffix == ".py" and (p.name != "__init__.py" or folder == ROOT / "cnn"))
                   or (p / "__init__.py").is_file()}
        unlisted += sorted(str(p.relative_to(ROOT)) for p in present - set(entries))
    assert not unlisted, f"docs/architecture.md does not say what these are for: {unlisted}"


def test_the_tree_reader_follows_the_levels():
    block = ("cnn/\n  a.py          what a is\n  sub/          a folder\n    b.py        what b\n"
             "                continues: c.py  is not an entry\n  d.py\n")
    assert tree_entries(block) == {ROOT: [ROOT / "cnn"],
                                   ROOT / "cnn": [ROOT / "cnn/a.py", ROOT / "cnn/sub",
                                                  ROOT / "cnn/d.py"],
                                   ROOT / "cnn/sub": [ROOT / "cnn/sub/b.py"]}


# ---- the README's layout ------------------------------------------------------------------------
def readme_layout_paths() -> list[Path]:
    """The paths the README's layout block names: its first column (``cnn/layers.py,
    losses.py``: the later names beside the first) and the files and folders its descriptions
    name inside a folder of the first column (``base.py`` of ``cnn/backends/``)."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## Layout"):]
    block = BLOCK.search(section).group(1)
    paths, folder = [], None
    for line in block.splitlines():
        if line.startswith(" "):  # the description of the entry above continues
            first, description = "", line.strip()
        else:
            first, _, description = line.partition("  ")
        if first:
            base, folder = ROOT, None
            for token in (t.strip() for t in first.split(",")):
                path = ROOT / token if "/" in token.rstrip("/") else base / token
                base = path.parent
                paths.append(path)
                folder = path if token.endswith("/") else None
        if folder is not None:
            for token in re.findall(r"(?<![\w./-])([A-Za-z_][\w-]*(?:\.py|\.ipynb|/))"
                                    r"(?=[\s,;:)]|$)", description):
                paths.append(folder / token)
    return paths


def test_the_readme_layout_names_what_exists():
    paths = readme_layout_paths()
    assert ROOT / "cnn" / "backends" / "base.py" in paths  # the descriptions are read too
    missing = sorted({str(p.relative_to(ROOT)) for p in paths if not p.exists()})
    assert not missing, f"README.md's layout names what does not exist: {missing}"


def test_the_code_cites_documents_that_exist():
    """The docstrings and comments that send a reader to a document (``docs/measuring.md``)
    name one that exists."""
    cited = {(str(src.relative_to(ROOT)), doc)
             for src in sorted((ROOT / "cnn").rglob("*.py")) + sorted(ROOT.glob("notebooks/*.ipynb"))
             for doc in re.findall(r"\bdocs/[\w.\-/]+\.md\b", src.read_text(encoding="utf-8"))}
    assert ("cnn/train.py", "docs/measuring.md") in cited
    missing = sorted(f"{src}: {doc}" for src, doc in cited if not (ROOT / doc).is_file())
    assert not missing, f"documents cited that do not exist: {missing}"
