"""One-way layers, read from the source: every ``import`` in ``olmo2/``,
``olmo2_kernels/`` and ``benchmarks/`` (at module level and inside functions) is
parsed with ``ast``.

* ``olmo2_kernels`` never imports ``olmo2``: the kernels ship alone.
* The benchmarks depend on both; neither imports them.
* Outside ``olmo2_kernels`` only its public names are used: no import of a private
  module (``olmo2_kernels._backend``) and no ``olmo2_kernels._name`` attribute.
* No cycle among the modules of the two packages: an import that would close one
  (a model that imports its own checkpoint I/O, a config that imports the
  trainer) fails here with the cycle spelled out.

Implicit imports of a parent package (importing ``olmo2.train.config`` first runs
``olmo2/train/__init__.py``) are Python's mechanics, not edges; ``from pkg import
name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("olmo2", "olmo2_kernels", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def discover() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The known modules that module ``name`` (at ``path``) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()

    def nearest_known(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            module = nearest_known(target)
            if module is not None and module != name:
                found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = discover()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [spell_cycle(graph, component) + ([f"(all of: {', '.join(component)})"] if len(component) > 2 else [])
            for component in components]


def spell_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A path a -> ... -> a inside ``component``, for the failure message."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nexts = sorted(graph[path[-1]] & members)
        if start in nexts and len(path) > 1:
            return path + [start]
        step = next((n for n in nexts if n not in seen), None)
        if step is None:
            return path + [start]
        path.append(step)
        seen.add(step)


def test_kernels_never_import_the_model_package():
    graph = import_graph()
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items() if module.partition(".")[0] == "olmo2_kernels"
        for target in targets if target.partition(".")[0] == "olmo2"
    )
    assert not offenders, "olmo2_kernels must not depend on olmo2:\n" + "\n".join(offenders)


def test_nothing_below_imports_the_benchmarks():
    graph = import_graph()
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items() if module.partition(".")[0] != "benchmarks"
        for target in targets if target.partition(".")[0] == "benchmarks"
    )
    assert not offenders, "olmo2 and olmo2_kernels must not depend on the benchmarks:\n" + "\n".join(offenders)


def private_kernel_uses(path: Path, known: set[str]) -> list[str]:
    """``olmo2_kernels._x`` imports and attribute reads in the file at ``path``."""
    name = module_name(path) if path.is_relative_to(ROOT) else path.stem
    found = [f"imports {t}" for t in sorted(imports_of(name, path, known))
             if t.startswith("olmo2_kernels.") and t.split(".")[1].startswith("_")]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if (isinstance(node, ast.ImportFrom) and node.module == "olmo2_kernels" and not node.level
                and any(a.name.startswith("_") and not a.name.startswith("__") for a in node.names)):
            found.append(f"line {node.lineno}: from olmo2_kernels import {', '.join(a.name for a in node.names)}")
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "olmo2_kernels"
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: olmo2_kernels.{node.attr}")
    return found


def test_only_public_kernel_names_are_used_outside_the_kernel_package():
    modules = discover()
    known = set(modules)
    offenders = [f"{path.relative_to(ROOT)}: {use}" for name, path in modules.items()
                 if not name.startswith("olmo2_kernels") for use in private_kernel_uses(path, known)]
    assert not offenders, "use olmo2_kernels' public API (add to __all__ what is missing):\n" + "\n".join(offenders)


def test_the_checker_sees_private_kernel_names(tmp_path):
    known = {"olmo2_kernels", "olmo2_kernels._backend"}
    (tmp_path / "bench.py").write_text("import olmo2_kernels\nfrom olmo2_kernels import _backend\n"
                                       "def f():\n    return olmo2_kernels._backend.OPS, olmo2_kernels.__version__\n")
    uses = private_kernel_uses(tmp_path / "bench.py", known)
    assert uses == ["imports olmo2_kernels._backend", "line 2: from olmo2_kernels import _backend",
                    "line 4: olmo2_kernels._backend"], uses


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_model_imports_neither_io_nor_generation_nor_the_trainer():
    graph = import_graph()
    for layer in ("olmo2.config", "olmo2.model"):
        assert not graph[layer] & {"olmo2.checkpoint_hf", "olmo2.generation", "olmo2.soup", "olmo2.tokenize"}, layer
        assert not {t for t in graph[layer] if t.startswith(("olmo2.train", "olmo2.cli"))}, layer
    # Nothing in the library imports the command-line shells.
    assert not [m for m, ts in graph.items() if not m.startswith("olmo2.cli") and any(t.startswith("olmo2.cli") for t in ts)
                and m != "olmo2.train.__main__"]


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The test itself: a function-level import that closes a cycle is found."""
    known = {"pkg", "pkg.a", "pkg.b"}
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    graph = {"pkg": set(), "pkg.a": imports_of("pkg.a", tmp_path / "a.py", known),
             "pkg.b": imports_of("pkg.b", tmp_path / "b.py", known)}
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_the_checker_sees_a_kernel_importing_the_model(tmp_path):
    (tmp_path / "op.py").write_text("def f():\n    from olmo2.model import IGNORE_INDEX\n")
    known = {"olmo2", "olmo2.model", "olmo2_kernels", "olmo2_kernels.op"}
    assert imports_of("olmo2_kernels.op", tmp_path / "op.py", known) == {"olmo2.model"}
