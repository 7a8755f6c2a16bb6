"""The import graph of mimscale and data_prep: the layer order (every import points down or
sideways), no cycle anywhere (function-level imports count), function-level imports only for
optional heavy dependencies, one module naming the method key, and no method file importing the
registry back.

The graph is read from the source (ast), not from sys.modules: an import inside a function is an
edge too, and importing ``a.b.c`` executes ``a/__init__`` and ``a/b/__init__`` first (an edge to
each, except to the importing module's own parent packages, which Python has already started).
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("mimscale", "data_prep")
# Function-level imports allowed: optional heavy third-party packages, and the one module that is
# nothing but the binding of one (importing ffcv_loader imports ffcv and numba).
LAZY_OK = {"ffcv", "numba", "mlflow", "matplotlib", "mimscale.data.ffcv_loader"}

# The layers, bottom first: a module may import its own layer and those below, never one above.
# A module's layer is that of the longest prefix listed (so a contract module can sit below the
# rest of its package). config sits above the methods: it takes each method's section and the
# method names from the registry.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # error types, the DeepSpeed JSON, optimizers, the shipped presets / ds_configs by name
    ("bottom", ("mimscale.errors", "mimscale.ds_config", "mimscale.optim", "mimscale.shipped")),
    ("runtime", ("mimscale.runtime",)),  # process group, preemption, fail-fast, output-dir lock, Stateful
    ("data", ("mimscale.data",)),
    ("models", ("mimscale.models", "mimscale.masking.base")),  # MaskPlan/Masker: the contract models speak
    ("checkpoint", ("mimscale.checkpoint",)),
    ("masking", ("mimscale.masking", "mimscale.objectives")),
    ("hooks", ("mimscale.hooks",)),
    ("methods", ("mimscale.methods",)),
    ("config", ("mimscale.config", "mimscale.config_keys")),
    ("eval", ("mimscale.eval", "mimscale.export")),  # features, probes, CKA; the export writer
    ("tracking", ("mimscale.tracking", "mimscale.planning")),  # planning: the memory planner's parts
    ("trainer", ("mimscale.trainer",)),
    ("entry points", ("mimscale.pretrain", "mimscale.preview", "mimscale.bench", "mimscale.eval.__main__", "mimscale.report", "mimscale.plan",
                      "mimscale.cli", "mimscale.__main__", "data_prep")),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


PACKAGE_INITS = {m for m, p in _modules().items() if p.name == "__init__.py"}


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported name, at function level) for every import statement in the file, with
    ``from pkg import sub`` resolved to the submodule when ``pkg.sub`` is a module."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                subs = [f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in modules]
                if len(subs) < len(child.names):  # some names come from the module itself
                    out.append((child.module, in_function))
                out.extend((m, in_function) for m in subs)  # (the graph adds their packages)
            visit(child, inner)

    visit(tree, False)
    return out


def _graph() -> dict[str, set[str]]:
    """module -> our modules its import statements execute (packages' __init__ included, but not
    the module's own parent packages unless it imports names from them)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        parents = {".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)}
        for imported, _ in _imports(path, modules):
            parts = imported.split(".")
            for k in range(1, len(parts) + 1):  # a.b.c runs a, a.b, a.b.c
                target = ".".join(parts[:k])
                if target in modules and target != name and (target not in parents or target == imported):
                    graph[name].add(target)
    return graph


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest listed prefix of ``module``."""
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    if found is None:
        raise KeyError(f"{module} is in no layer of tests/unit/test_imports.py LAYERS: add it")
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every arrow from a module to one in a higher layer, as 'a (layer) -> b (layer)'."""
    out = []
    # a package whose __init__ imports none of our modules is a folder with a docstring: no layer
    bare = {m for m, targets in graph.items() if not targets and m in PACKAGE_INITS}
    for a, targets in graph.items():
        if a in bare:
            continue
        for b in targets - bare:
            if layer_of(b) > layer_of(a):
                out.append(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})")
    return sorted(out)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_no_data_module_in_an_import_cycle():
    graph = _graph()
    assert "mimscale.data.streams" in graph and "mimscale.data.imagenet" in graph
    bad = [c for c in _cycles(graph) if any(m.startswith("mimscale.data") for m in c)]
    assert not bad, f"import cycles through mimscale.data: {bad}"


def test_cycle_finder_sees_function_level_imports(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    probe = tmp_path / "probe.py"
    probe.write_text("import os\ndef f():\n    from mimscale.data import streams\n")
    found = _imports(probe, _modules())
    assert ("mimscale.data.streams", True) in found and ("os", False) in found


def test_no_import_cycle_anywhere():
    graph = _graph()
    assert "mimscale.methods" in graph and "data_prep.wds" in graph
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"


def test_function_level_imports_are_only_heavy_optional_deps():
    """Our own modules are imported at the top (a hidden cycle or a slow first call otherwise)."""
    modules = _modules()
    found = []
    for name, path in modules.items():
        for imported, lazy in _imports(path, modules):
            ours = imported.split(".")[0] in PACKAGES
            if lazy and ours and not any(imported == ok or imported.startswith(ok + ".") for ok in LAZY_OK):
                found.append(f"{name}: {imported}")
    assert not found, f"function-level imports of our modules (only heavy optional deps may be lazy): {found}"


def test_only_the_registry_reads_the_method_key():
    """``masking.method`` is named in one module: every other one asks mimscale.methods."""
    files = [p for d in (*PACKAGES, "benchmarks", "docker", "scripts") for p in (REPO / d).rglob("*.py")]
    named = sorted(str(p.relative_to(REPO)) for p in files if "masking.method" in p.read_text())
    assert named == ["mimscale/methods/__init__.py"], named


def test_every_module_has_a_layer_and_no_import_runs_upward():
    graph = _graph()
    for m in graph:
        if m not in ("mimscale", "data_prep"):
            layer_of(m)  # raises naming a module that no layer lists
    up = upward_imports(graph)
    assert not up, "imports that run from a lower layer to a higher one:\n" + "\n".join(up)


def test_the_layer_check_sees_an_upward_import():
    assert upward_imports({"mimscale.data.loader": {"mimscale.trainer"}, "mimscale.trainer": set()}) == [
        "mimscale.data.loader (data) -> mimscale.trainer (trainer)"]
    assert layer_of("mimscale.masking.base") < layer_of("mimscale.masking.amt")  # the longest prefix wins


def test_lower_packages_never_import_methods_trainer_or_tracking():
    """runtime, checkpoint, data and models know nothing of methods, the Trainer or tracking, even
    indirectly."""
    graph = _graph()
    low = ("mimscale.runtime", "mimscale.checkpoint", "mimscale.data", "mimscale.models")
    high = ("mimscale.methods", "mimscale.trainer", "mimscale.tracking")
    for start in (m for m in graph if m.startswith(low)):
        reached, todo = set(), [start]
        while todo:
            for t in graph[todo.pop()] - reached:
                reached.add(t)
                todo.append(t)
        assert not [m for m in reached if m.startswith(high)], (start, sorted(m for m in reached if m.startswith(high)))


def test_no_method_file_imports_the_registry_back():
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("mimscale.methods."):
            named = {imported for imported, _ in _imports(path, modules)}
            assert "mimscale.methods" not in named, f"{name} imports the registry (mimscale.methods) back"


def test_data_reaches_no_layer_above_it():
    """data is at the bottom: nothing it imports, directly or not, is a model, masker, objective,
    loop hook, the engine or an entry point (small shared modules such as dist are fine)."""
    graph = _graph()
    above = ("mimscale.models", "mimscale.masking", "mimscale.objectives", "mimscale.hooks", "mimscale.trainer",
             "mimscale.eval", "mimscale.export", "mimscale.pretrain", "mimscale.methods", "mimscale.bench",
             "mimscale.checkpoint", "mimscale.tracking", "mimscale.config")
    reached, todo = set(), [m for m in graph if m.startswith("mimscale.data")]
    while todo:
        for t in graph[todo.pop()] - reached:
            reached.add(t)
            todo.append(t)
    up = sorted(m for m in reached if m.startswith(above))
    assert not up, f"mimscale.data reaches modules above it: {up}"
