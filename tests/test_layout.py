"""The library's layout: one home per paper under ``person_retrieval.papers``, shared infrastructure that
imports no paper, and no import circles (every import statement counts, also those inside functions)."""
import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"
PKG = LIB / "person_retrieval"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its text (``from X import y`` counts as an
    import of ``X.y`` when that is a module, else of ``X``)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in mods else mod for a in node.names]
            else:
                continue
            out |= {t for t in targets if t in mods and t != name}
        graph[name] = out
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    g = import_graph()
    # papers.tpr imports train.load_weights inside a method; ctgi imports tpr at the top.
    assert "person_retrieval.train" in g["person_retrieval.papers.tpr"]
    assert "person_retrieval.papers.tpr" in g["person_retrieval.papers.ctgi"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_shared_modules_import_no_paper():
    g = import_graph()
    bad = {m: sorted(t for t in ts if t.startswith("person_retrieval.papers"))
           for m, ts in g.items() if not m.startswith("person_retrieval.papers")}
    assert not {m: ts for m, ts in bad.items() if ts}, "shared infrastructure must not import a paper module"


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_every_paper_module_is_named_in_the_papers_index():
    doc = (PKG / "papers" / "__init__.py").read_text()
    for p in sorted((PKG / "papers").glob("[a-z]*.py")):
        assert f":mod:`.{p.stem}`" in doc, p.name
