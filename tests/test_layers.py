"""Imports point one way: kernels <- IR <- backends <- capture <- API/engine/CLI, with no cycles
(module-level and function-level imports alike)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# lower layers first; a module may import only from its own layer or below
LAYERS = [
    {"kernels", "version", "extension", "normalize", "cpu_kernels", "winograd", "_C", "_guard", "_cpu", "_onednn"},
    {"ir", "ir_quant", "fold", "guard"},
    {"backend"},
    {"capture"},
]


def _fastres_imports(path: pathlib.Path, package: str) -> set:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module and node.module.startswith("fastres."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastres."):
                    found.add(alias.name.split(".")[1])
    return found - {package}


def _graph() -> dict:
    graph = {p.stem: _fastres_imports(p, p.stem) for p in (ROOT / "fastres").glob("*.py")}
    graph["kernels"] = set()     # kernels/ imports torch and triton only (checked below)
    return graph


def _layer(name: str):
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    return len(LAYERS)        # API, engine, CLI, reports


def test_imports_point_down():
    for module, imports in _graph().items():
        for imported in imports:
            assert _layer(imported) <= _layer(module), f"fastres.{module} imports fastres.{imported}"


def test_no_import_cycles():
    graph = _graph()
    seen, stack = set(), []

    def visit(node):
        assert node not in stack, "import cycle: " + " -> ".join(stack[stack.index(node):] + [node])
        if node in seen:
            return
        stack.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        stack.pop()
        seen.add(node)
    for node in graph:
        visit(node)


def test_kernels_import_no_fastres_module():
    for path in (ROOT / "kernels").glob("*.py"):
        text = path.read_text()
        assert "from fastres" not in text and "import fastres" not in text, path.name
