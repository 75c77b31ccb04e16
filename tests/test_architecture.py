"""The package's shape: no import cycles between modules or between packages (counting imports
inside functions), offline tooling off the runtime path, and every packed format and adapter going
through the shared contracts."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "ciuic_lab"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """{module: modules of this package it imports}, from every import statement anywhere in the
    file (top level or inside functions). `from pkg import name` counts as importing pkg.name
    when that is a module, else pkg."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                           for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in targets if t in modules and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _unit(module: str) -> str:
    """The top-level subpackage or module of ciuic_lab that `module` belongs to."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """{unit: units it imports from}, a unit being ciuic_lab's root or one of its top-level
    subpackages or modules. Importing any module of a package runs the package's __init__ first,
    so a module-level graph misses cycles through an __init__ (and layering is about packages
    anyway): here any import from package Q by any module of P makes P depend on Q. The root
    `ciuic_lab` only counts where it is imported by name: every import runs it, so counting those
    would make every unit depend on it."""
    out: dict[str, set[str]] = {_unit(m): set() for m in graph}
    for mod, targets in graph.items():
        out[_unit(mod)] |= {_unit(t) for t in targets} - {_unit(mod)}
    return out


def test_graph_sees_function_level_imports():
    g = import_graph()
    # both import inside a function only; the graph must see them
    assert "ciuic_lab.models.loader" in g["ciuic_lab"]
    assert "ciuic_lab.models.fetch" in g["ciuic_lab.models.loader"]


def test_a_cycle_is_found_when_there_is_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_package_graph_sees_imports_of_a_package_and_of_its_modules():
    g = {"ciuic_lab.p": set(), "ciuic_lab.p.a": {"ciuic_lab.q"}, "ciuic_lab.q": set(),
         "ciuic_lab.q.b": {"ciuic_lab.p.a", "ciuic_lab.q"}}
    assert cycles(package_graph(g)) == [["ciuic_lab.p", "ciuic_lab.q"]]


def test_no_module_imports_another_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_no_package_imports_another_that_imports_it_back():
    g = import_graph()
    found = cycles(package_graph(g))
    # name the imports that close each cycle, so a failure says what to move
    culprits = {c: sorted(f"{m} -> {t}" for m in g if _unit(m) in c for t in g[m]
                          if _unit(t) in c and _unit(t) != _unit(m))
                for c in map(tuple, found)}
    assert culprits == {}


def test_runtime_never_imports_the_offline_tools():
    g = import_graph()
    runtime = [m for m in g if not m.startswith("ciuic_lab.tools")]
    bad = {m: sorted(t for t in g[m] if t.startswith("ciuic_lab.tools")) for m in runtime}
    assert {m: t for m, t in bad.items() if t} == {}


def test_every_packed_format_implements_the_contract():
    import torch

    from ciuic_lab.compress.store.formats import FORMATS, PackedLayer, format_class, is_packed

    for key in FORMATS:
        cls = format_class(key)
        assert cls.format == key
        spec = {"format": key, "in": 8, "out": 4, "meta": {"base": None, "lowrank": None,
                                                          "bias": False, "dtype": "float16"},
                "scheme": "int8", "blocksize": 64, "threshold": 6.0}
        shell = cls.shell(spec, {})
        assert isinstance(shell, PackedLayer) and is_packed(shell)
        assert shell.spec()["format"] == key and shell.params == 32
        assert not is_packed(torch.nn.Linear(8, 4))


# Module paths and projection names only the adapter may spell (`models/adapters.py`).
LAYOUT_NAMES = {"layers", "embed_tokens", "norm", "rotary_emb", "lm_head", "self_attn", "mlp",
                "shared_experts", "gate_up_proj", "down_proj", "o_proj", "v_proj", "kv_b_proj"}
# Files that once walked the layout themselves and now ask the adapter.
ROTATE = tuple(f"compress/rotate/{m}.py"
               for m in ("__init__", "matrices", "fused", "online", "streamed"))
WALK = tuple(f"compress/walk/{m}.py" for m in ("blocks", "pipeline", "distributed"))
ASK_THE_ADAPTER = (*ROTATE, *WALK, "compress/store/experts.py", "export.py", "hold.py",
                   "compress/tune/e2e_walk.py")


def layout_accesses(source: str) -> list[str]:
    """`x.<name>` and `getattr(x, "<name>")` (setattr, hasattr, delattr too) for the names of
    LAYOUT_NAMES, with their line numbers."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in LAYOUT_NAMES \
                and not _on_adapter(node.value) and not _own_list(node):
            out.append(f"{node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
              and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in LAYOUT_NAMES):
            out.append(f"{node.lineno}: {node.func.id}(…, {node.args[1].value!r})")
    return out


def _on_adapter(node: ast.expr) -> bool:
    """`ad.layers(…)`, `self.adapter.layers(…)`: the adapter's own methods, not a module path."""
    return (isinstance(node, ast.Name) and node.id in ("ad", "adapter")) or (
        isinstance(node, ast.Attribute) and node.attr == "adapter")


def _own_list(node: ast.Attribute) -> bool:
    """`report.layers`, `self.layers`: an object's own list; the layout's is `….model.layers`."""
    return node.attr == "layers" and not (isinstance(node.value, ast.Attribute)
                                          and node.value.attr == "model")


def test_layout_access_is_found():
    src = ('a = model.model.layers\nb = getattr(e, "gate_up_proj")\nc = layer.weight\n'
           'd = ad.layers(block)\ne = provider.adapter.layers(block)\nf = report.layers\n'
           'g = self.model.layers\n')
    assert layout_accesses(src) == ["1: .layers", "2: getattr(…, 'gate_up_proj')", "7: .layers"]


def test_the_adapter_owns_the_layout():
    """Rotations, packed experts and the export walk no module path of their own: blocks, ends,
    expert projections and rotation layouts all come from the model's adapter."""
    found = {f: layout_accesses((PKG / f).read_text()) for f in ASK_THE_ADAPTER}
    assert {f: a for f, a in found.items() if a} == {}


def test_every_benchmark_imports_names_the_lab_has():
    """A benchmark is run by hand, rarely: a name the lab renamed or moved must fail here, not
    in the middle of someone's hour-long measurement (kernel_micro.py once imported a removed
    `base_weight`)."""
    import importlib

    missing = []
    for f in sorted((PKG.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ciuic_lab"):
                mod = importlib.import_module(node.module)
                for alias in node.names:
                    if not hasattr(mod, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{f.name}: {node.module}.{alias.name}")
    assert not missing, missing
