"""The architecture of ``cnn/``, checked from the source: every module's imports are read with
``ast`` (nothing is imported) and the test fails on

1. an import cycle between modules;
2. a module importing another module's private (underscored) name, directly
   (``from .train import _epoch_line``) or through a module it imported (``P._entry``);
3. an upward import, against the layering drawn in :data:`LAYERS`.

An import inside a function counts like one at the top of the module: deferring an import
changes when a module loads, not what depends on what. A function-level import of a *lower*
layer is fine, and the way to keep ``import cnn`` light or an optional dependency optional
(``from .data import stratified_split`` in ``train``, ``import keras`` in ``optim``); one of a
*higher* layer is the same upward dependency as it would be at the top, and a cycle through it
is a cycle.

A package's ``__init__`` is the module of the package's own name (``cnn.parallel``); importing
a submodule does not count as importing its parents' ``__init__`` (Python runs them, but a
package that re-exports its submodules is not a cycle).

The exception is listed by name below: :data:`ALLOWED_UPWARD` is the design's one upward
import; :func:`test_every_listed_exception_still_occurs` fails when it no longer occurs, so it
never outlives its reason.

:data:`LAYERS` is also the picture in ``docs/architecture.md``:
:func:`test_the_docs_draw_these_layers` fails when the two differ.
"""
from __future__ import annotations

import ast
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cnn"
ARCHITECTURE_DOC = PACKAGE.parent / "docs" / "architecture.md"

#: The layers of the package, lowest first. A module may import modules of its own layer and
#: of lower layers. ``"cnn.backends.*"`` is the package and everything inside it; other
#: entries name one module. The top package ``cnn`` (its ``__init__``) is the public facade.
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["cnn.checks", "cnn.errors", "cnn.files", "cnn.context", "cnn.monitor",
                     "cnn.machine", "cnn.records", "cnn.extras", "cnn.trace"]),
    ("backends", ["cnn.backends.*"]),
    # the names of what the study runs: paths (backend x strategy x launcher) and where each
    # strategy lives; the standard library only (and the backends' records), so every layer
    # above may read it, and it names what it describes without importing it
    ("path registry", ["cnn.paths"]),
    ("data and presets", ["cnn.data", "cnn.datafile", "cnn.presets", "cnn.augment",
                          "cnn.normalize"]),
    ("layers and optimizers", ["cnn.layers", "cnn.plan", "cnn.losses", "cnn.optim",
                               "cnn.schedules"]),
    ("model", ["cnn.model"]),
    ("strategies", ["cnn.parallel.*"]),
    ("training loop", ["cnn.train", "cnn.backup", "cnn.callbacks", "cnn.configs"]),
    ("references", ["cnn.reference.*"]),
    ("study, analysis, benchmarks, the emulated cluster",
     ["cnn.results", "cnn.study.*", "cnn.analysis.*", "cnn.bench.*", "cnn.cluster.*"]),
    ("commands", ["cnn.cli", "cnn.predict", "cnn.__main__", "cnn"]),
]

#: upward imports the design keeps: (importer, imported) -> why
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("cnn.model", "cnn.train"): "Sequential.fit is Keras's Model.fit: a function-level import "
                                "of the fit loop, which never imports the model back",
}


# ---- reading the imports ---------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    importer: str        # the module whose source holds the import
    module: str          # the module imported (a package's __init__ is the package's name)
    name: str | None     # a name taken from it (``from m import name``), or None
    line: int

    def __str__(self) -> str:
        what = f"{self.module}.{self.name}" if self.name else self.module
        return f"{self.importer}:{self.line} imports {what}"


def module_names(root: Path) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def read_imports(root: Path) -> list[Import]:
    """Every import of a module of the package, anywhere in every module of it."""
    modules = module_names(root)
    top = root.name
    found = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        aliases: dict[str, str] = {}  # local name -> module, for attribute access
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == top:
                        found.append(Import(name, a.name, None, node.lineno))
                        if a.asname:  # ``import cnn.paths as P``; plain ``import cnn.x`` binds cnn
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != top:
                    continue
                for a in node.names:
                    if f"{source}.{a.name}" in modules:  # a submodule: ``from . import paths``
                        found.append(Import(name, f"{source}.{a.name}", None, node.lineno))
                        aliases[a.asname or a.name] = f"{source}.{a.name}"
                    else:
                        found.append(Import(name, source, a.name, node.lineno))
        for node in ast.walk(tree):  # ``P._entry`` where P is a module of the package
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(Import(name, aliases[node.value.id], node.attr, node.lineno))
    return [i for i in found if i.module in modules and i.module != i.importer]


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of ``module`` (the most specific entry that names it)."""
    best, best_len = None, -1
    for i, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            prefix = entry.removesuffix(".*")
            hit = module == prefix or (entry.endswith(".*") and module.startswith(prefix + "."))
            if hit and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def is_private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")



def cycles(imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.importer, set()).add(imp.module)
        graph.setdefault(imp.module, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_report(imports: list[Import]) -> list[str]:
    out = []
    for component in cycles(imports):
        inside = sorted({str(i) for i in imports
                         if i.importer in component and i.module in component})
        out.append(" <-> ".join(component) + ":\n    " + "\n    ".join(inside))
    return out


def upward(imports: list[Import]) -> list[Import]:
    return [i for i in imports
            if layer_of(i.importer) is not None and layer_of(i.module) is not None
            and layer_of(i.module) > layer_of(i.importer)
            and (i.importer, i.module) not in ALLOWED_UPWARD]


# ---- the package -----------------------------------------------------------------------------
IMPORTS = read_imports(PACKAGE)


def test_every_module_has_a_layer():
    missing = sorted(m for m in module_names(PACKAGE) if layer_of(m) is None)
    assert not missing, f"modules without a layer (add them to LAYERS): {missing}"


def test_no_import_cycle():
    found = cycle_report(IMPORTS)
    assert not found, "import cycles:\n  " + "\n  ".join(found)


def test_no_private_name_of_another_module():
    found = sorted(str(i) for i in IMPORTS if is_private(i.name))
    assert not found, ("private names imported from other modules (make them public where "
                       "they are shared):\n  " + "\n  ".join(found))


def test_no_upward_import():
    found = sorted(f"{i} (layer {LAYERS[layer_of(i.importer)][0]!r} -> "
                   f"{LAYERS[layer_of(i.module)][0]!r})" for i in upward(IMPORTS))
    assert not found, "imports against the layering:\n  " + "\n  ".join(found)


def test_every_listed_exception_still_occurs():
    """An exception that no longer occurs is deleted, so that it cannot hide a new import."""
    stale = [key for key in ALLOWED_UPWARD
             if not any((i.importer, i.module) == key for i in IMPORTS)]
    assert not stale, f"exceptions that no longer occur (delete them): {stale}"


def drawn_layers(text: str) -> list[tuple[str, list[str]]]:
    """The layers the picture in ``text`` draws, lowest first: ``(name, modules)``. The picture
    is the code block drawn with ``+---`` rules, one box per layer: ``| 9 name | modules |``,
    a name or its modules wrapping onto more rows of the box."""
    block = next(b for b in re.findall(r"^```\n(.*?)^```", text, re.S | re.M) if "+---" in b)
    boxes: list[list[list[str]]] = [[]]
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("+"):
            boxes.append([])
        elif line.startswith("|"):
            boxes[-1].append([cell.strip() for cell in line.strip("|").split("|")])
    drawn = []
    for rows in (b for b in boxes if b):
        name = re.sub(r"^\d+\s+", "", " ".join(r[0] for r in rows if r[0]))
        drawn.append((name, [m for r in rows for m in r[1].split()]))
    return drawn[::-1]


def test_the_docs_draw_these_layers():
    """docs/architecture.md draws :data:`LAYERS`: the same layers, in the same order, with the
    same modules (a package as its name, in any order within its layer)."""
    expected = [(name, sorted(e.removesuffix(".*") for e in entries)) for name, entries in LAYERS]
    drawn = drawn_layers(ARCHITECTURE_DOC.read_text(encoding="utf-8"))
    assert [(name, sorted(modules)) for name, modules in drawn] == expected


# ---- the checks themselves, on a made-up package ------------------------------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "cnn"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_the_checks_find_what_they_look_for(tmp_path):
    root = _package(tmp_path, {
        "checks.py": "from .layers import Dense\n",              # upward, and a cycle
        "layers.py": "def f():\n    from .checks import _hidden\n",  # lazy, private
        "paths.py": "def _entry(): pass\n",
        "results.py": "from . import paths as P\nx = P._entry\n",  # private via a module
        "parallel/__init__.py": "from .threads import Sync\n",
        "model.py": "",
        "parallel/threads.py": "from .base import Strategy\nfrom ..model import build\n",
        "parallel/base.py": "",
    })
    imports = read_imports(root)
    assert cycle_report(imports) and cycles(imports) == [["cnn.checks", "cnn.layers"]]
    assert sorted(str(i) for i in imports if is_private(i.name)) == [
        "cnn.layers:2 imports cnn.checks._hidden", "cnn.results:2 imports cnn.paths._entry"]
    assert [(i.importer, i.module) for i in upward(imports)] == [("cnn.checks", "cnn.layers")]
    # a package importing its submodules and a submodule importing a sibling are no cycle
    assert ("cnn.parallel.threads", "cnn.parallel.base") in {(i.importer, i.module)
                                                             for i in imports}
    assert not [c for c in cycles(imports) if "cnn.parallel" in c]


@pytest.mark.parametrize("module, layer", [
    ("cnn.checks", "foundations"), ("cnn.backends", "backends"),
    ("cnn.backends.numba.kernels", "backends"), ("cnn.parallel.threads", "strategies"),
    ("cnn.reference.torch", "references"), ("cnn.bench.mpi", "study, analysis, benchmarks, the emulated cluster"),
    ("cnn", "commands"),
])
def test_layers_cover_packages_and_their_future_modules(module, layer):
    assert LAYERS[layer_of(module)][0] == layer


def test_a_module_no_layer_names_has_none():
    assert layer_of("cnn.scheduler") is None and layer_of("cnn.checks_extra") is None
