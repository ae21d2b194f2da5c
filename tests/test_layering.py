"""Imports only go downward: the package layout reads as the data's path.

Layers, lowest first. A module may import modules of its own layer and of the layers below it,
never of a layer above; a prefix names a module and everything under it, the longest prefix wins.

====  ==========  ==================================================================================
  0   base        ``hvpmtl.reprs``: value formatting for one-line errors; ``hvpmtl.files``: atomic writes
  1   configs     ``hvpmtl.config_io`` (ConfigError, dict <-> dataclass), ``hvpmtl.data.config``,
                  ``hvpmtl.engine.config``: plain config blocks and their checks
  2   data        ``hvpmtl.data``: sources, decoding, views, masks, shards
  3   backbones   ``hvpmtl.backbones``: masked timm ViT / Swin, start weights
  4   objectives  ``hvpmtl.objectives``: MLC, SwAV, SimMIM, distillation (heads + losses)
  5   config      ``hvpmtl.config``: the whole pre-training config (the blocks above), YAML presets;
                  ``hvpmtl.config_reference``: every key's type, default and help
  6   model       ``hvpmtl.hvp``: backbone + objectives as one module
  7   engine      ``hvpmtl.engine``: loop, checkpoints, distribution, run folder;
                  ``hvpmtl.runs``: reading a run's outputs (config, weights, class names)
  8   downstream  ``hvpmtl.eval``, ``hvpmtl.viz``: evaluation commands, pictures, reports
  9   api         ``hvpmtl`` (the package root only): ``build``, ``load_config``, ``__version__``;
                  ``hvpmtl.pretraining``: pre-training as a task of the engine's loop, with its hooks
 10   cli         ``hvpmtl.cli``, ``hvpmtl.__main__``
====  ==========  ==================================================================================

Checked: every ``import`` / ``from ... import`` (relative ones resolved) at module level, inside
functions and under ``if TYPE_CHECKING:``. Module-level imports must also form no cycle; an
import of ``a.b.c`` from outside ``a.b`` also runs ``a.b/__init__`` and counts as an import of
it (the root ``hvpmtl`` excepted: every module runs it). Across units of the table (its
prefixes), no cycle either, counting imports inside functions too.

:data:`KNOWN_VIOLATIONS` lists the upward imports being removed now; it only shrinks: an entry
that no longer occurs fails the test as well.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hvpmtl"
ROOT = "hvpmtl"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("hvpmtl.reprs", "hvpmtl.files")),
    ("configs", ("hvpmtl.config_io", "hvpmtl.data.config", "hvpmtl.engine.config")),
    ("data", ("hvpmtl.data",)),
    ("backbones", ("hvpmtl.backbones",)),
    ("objectives", ("hvpmtl.objectives",)),
    ("config", ("hvpmtl.config", "hvpmtl.config_reference")),
    ("model", ("hvpmtl.hvp",)),
    ("engine", ("hvpmtl.engine", "hvpmtl.runs")),
    ("downstream", ("hvpmtl.eval", "hvpmtl.viz")),
    ("api", (ROOT, "hvpmtl.pretraining")),
    ("cli", ("hvpmtl.cli", "hvpmtl.__main__")),
]

# (importing module, imported module) -> why it is still here
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
}


@dataclass(frozen=True)
class Import:
    """One import statement's target: ``where`` is ``module``, ``function`` or ``typing``."""

    importer: str
    target: str
    line: int
    where: str


def module_names(src: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package folder ``src``."""
    names = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The deepest module of ``name`` that exists (``a.b.func`` -> ``a.b``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a package module by ``module`` (at any depth of its syntax tree)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    root = module.partition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            inner = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                inner = "function"
            elif isinstance(child, ast.If) and _is_type_checking(child) and where == "module":
                inner = "typing"
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.partition(".")[0] == root:
                        found.append(Import(module, _resolve(alias.name, modules), child.lineno, where))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1])
                    source = f"{base}.{child.module}" if child.module else base
                else:
                    source = child.module or ""
                if source.partition(".")[0] != root:
                    continue
                for alias in child.names:
                    name = f"{source}.{alias.name}"
                    target = name if name in modules else _resolve(source, modules)
                    found.append(Import(module, target, child.lineno, where))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "module")
    return found


def all_imports(src: Path = SRC) -> tuple[dict[str, Path], list[Import]]:
    modules = module_names(src)
    return modules, [i for m, p in modules.items() for i in imports_of(m, p, modules) if i.target != m]


def unit_of(module: str, layers=LAYERS) -> tuple[int, str]:
    """``(layer index, table prefix)`` of ``module``: its longest prefix in ``layers``."""
    best = None
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            root = prefix == prefix.partition(".")[0]  # the package root names itself only
            inside = module == prefix or (not root and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise KeyError(f"{module} has no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def upward(imports: list[Import], layers=LAYERS) -> dict[tuple[str, str], list[Import]]:
    """``(importer, target) -> statements`` of each import of a higher layer."""
    found = defaultdict(list)
    for imp in imports:
        if unit_of(imp.target, layers)[0] > unit_of(imp.importer, layers)[0]:
            found[(imp.importer, imp.target)].append(imp)
    return dict(found)


def stale(known, imports: list[Import], layers=LAYERS) -> list[tuple[str, str]]:
    """Entries of ``known`` that are no longer imports of a higher layer."""
    return sorted(set(known) - set(upward(imports, layers)))


def module_graph(imports: list[Import]) -> dict[str, set[str]]:
    """Module-level imports, each with the package ``__init__`` files it runs (the root excepted)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if imp.where != "module":
            continue
        graph[imp.importer].add(imp.target)
        parts = imp.target.split(".")
        for n in range(2, len(parts)):
            package = ".".join(parts[:n])
            if imp.importer != package and not imp.importer.startswith(package + "."):
                graph[imp.importer].add(package)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:  # recursion depth <= number of modules (~100)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(set(graph) | {n for targets in graph.values() for n in targets}):
        if node not in index:
            connect(node)
    return sorted(found)


def unit_graph(imports: list[Import], skip=frozenset(), layers=LAYERS) -> dict[str, set[str]]:
    """Imports at any depth between units of the layer table, less the ``skip`` pairs."""
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in imports:
        if (imp.importer, imp.target) in skip:
            continue
        a, b = unit_of(imp.importer, layers)[1], unit_of(imp.target, layers)[1]
        if a != b:
            graph[a].add(b)
    return graph


def _where(imps: list[Import], modules: dict[str, Path]) -> str:
    first = imps[0]
    path = modules[first.importer].relative_to(SRC.parent.parent) if first.importer in modules else first.importer
    return f"{path}:{first.line} ({first.where})"


# ----------------------------------------------------------------------------------------------
# the package


@pytest.fixture(scope="module")
def scanned() -> tuple[dict[str, Path], list[Import]]:
    return all_imports()


def test_every_module_has_a_layer(scanned):
    modules, _ = scanned
    for module in modules:
        unit_of(module)


def test_the_table_in_the_docstring_matches_layers():
    rows = [line.split()[:2] for line in __doc__.splitlines() if line[:4].strip().isdigit()]
    assert rows == [[str(i), name] for i, (name, _) in enumerate(LAYERS)]
    assert all(f"``{prefix}``" in __doc__ for _, prefixes in LAYERS for prefix in prefixes)


def test_no_import_goes_up(scanned):
    modules, imports = scanned
    found = upward(imports)
    new = {pair: imps for pair, imps in found.items() if pair not in KNOWN_VIOLATIONS}
    lines = [
        f"{_where(imps, modules)}: {a} [{LAYERS[unit_of(a)[0]][0]}] imports {b} [{LAYERS[unit_of(b)[0]][0]}]"
        for (a, b), imps in sorted(new.items())
    ]
    assert not lines, "imports of a higher layer (see the table in tests/test_layering.py):\n" + "\n".join(lines)


def test_known_violations_still_occur(scanned):
    _, imports = scanned
    gone = stale(KNOWN_VIOLATIONS, imports)
    assert not gone, f"no longer imported upward, remove from KNOWN_VIOLATIONS in tests/test_layering.py: {gone}"


def test_no_module_level_cycle(scanned):
    _, imports = scanned
    assert cycles(module_graph(imports)) == []


def test_no_cycle_between_units_beyond_known_violations(scanned):
    """Function-level imports included; the known upward imports are left out, so what remains
    is a cycle between units of one layer (``hvpmtl.eval`` <-> ``hvpmtl.viz``) or a new one."""
    _, imports = scanned
    assert cycles(unit_graph(imports, skip=frozenset(KNOWN_VIOLATIONS))) == []


# ----------------------------------------------------------------------------------------------
# the checks themselves, on a made-up package


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "hvpmtl" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [p for p in (root / "hvpmtl").rglob("*") if p.is_dir()] + [root / "hvpmtl"]:
        (folder / "__init__.py").touch()
    return root / "hvpmtl"


def test_an_upward_import_inside_a_function_fails(tmp_path):
    src = _write(
        tmp_path,
        {
            "engine/loop.py": "def run():\n    from ..eval import monitor\n    return monitor\n",
            "eval/monitor.py": "from hvpmtl.engine.loop import run\n",
            "data/views.py": "import hvpmtl.reprs\n",
            "reprs.py": "",
        },
    )
    _, imports = all_imports(src)
    found = upward(imports)
    assert list(found) == [("hvpmtl.engine.loop", "hvpmtl.eval.monitor")]
    assert found[("hvpmtl.engine.loop", "hvpmtl.eval.monitor")][0] == Import(
        "hvpmtl.engine.loop", "hvpmtl.eval.monitor", 2, "function"
    )
    assert cycles(module_graph(imports)) == []  # inside a function: not a module-level cycle
    assert cycles(unit_graph(imports)) == [["hvpmtl.engine", "hvpmtl.eval"]]
    assert cycles(unit_graph(imports, skip={("hvpmtl.engine.loop", "hvpmtl.eval.monitor")})) == []
    known = {("hvpmtl.engine.loop", "hvpmtl.eval.monitor"): "", ("hvpmtl.data.views", "hvpmtl.reprs"): ""}
    assert stale(known, imports) == [("hvpmtl.data.views", "hvpmtl.reprs")]  # a downward import: stale


def test_a_module_level_cycle_through_a_package_init_fails(tmp_path):
    src = _write(
        tmp_path,
        {
            "engine/__init__.py": "from hvpmtl.engine.loop import run\n",
            "engine/loop.py": "from hvpmtl import config\nrun = 1\n",
            "engine/config.py": "",
            "config.py": "from hvpmtl.engine.config import *\n",
        },
    )
    _, imports = all_imports(src)
    assert upward(imports) == {}
    assert cycles(module_graph(imports)) == [["hvpmtl.config", "hvpmtl.engine", "hvpmtl.engine.loop"]]


def test_type_checking_imports_count_as_upward_but_not_as_cycles(tmp_path):
    src = _write(
        tmp_path,
        {
            "hvp.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from hvpmtl.engine import loop\n",
            "engine/loop.py": "import hvpmtl.hvp\n",
        },
    )
    _, imports = all_imports(src)
    assert list(upward(imports)) == [("hvpmtl.hvp", "hvpmtl.engine.loop")]
    assert cycles(module_graph(imports)) == []


def test_the_root_names_itself_only_and_the_longest_prefix_wins():
    def layer(module: str) -> str:
        return LAYERS[unit_of(module)[0]][0]

    assert (layer("hvpmtl"), unit_of("hvpmtl")[1]) == ("api", "hvpmtl")
    assert (layer("hvpmtl.engine.config"), unit_of("hvpmtl.engine.config")[1]) == ("configs", "hvpmtl.engine.config")
    assert (layer("hvpmtl.engine.loop"), unit_of("hvpmtl.engine.loop")[1]) == ("engine", "hvpmtl.engine")
    assert layer("hvpmtl.config_io") == "configs" and layer("hvpmtl.config") == "config"
    with pytest.raises(KeyError, match="hvpmtl.extra has no layer"):
        unit_of("hvpmtl.extra")
