"""The package's shape: no two of hift_rt's modules import each other, directly or through
others (function-level imports count: a circle hidden in a function is still a circle)."""
import ast
from pathlib import Path

import hift_rt

PACKAGE = Path(hift_rt.__file__).parent


def _module_names():
    """{dotted name: file} of every module of the installed package."""
    names = {}
    for file in PACKAGE.rglob("*.py"):
        parts = ("hift_rt", *file.relative_to(PACKAGE).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return names


def import_graph():
    """{module: the hift_rt modules it imports}. `from . import x` counts x when x is a module
    (the compiled _C is not), else the package; `from .m import name` counts m (and m.name if
    that is a module); `import hift_rt` the package."""
    modules = _module_names()
    graph = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                candidates = [f"{target}.{alias.name}" for alias in node.names]
                imported |= {c for c in candidates if c in modules}
                if node.module is not None and target in modules:
                    imported.add(target)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name in modules}
        graph[name] = imported - {name}
    return graph


def find_circle(graph):
    """One import circle [a, b, ..., a] among the modules, or None (depth-first search)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_finder_sees_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert {"hift_rt.config", "hift_rt.optimizer", "hift_rt.job.train"} <= graph.keys()
    assert "hift_rt.config" in graph["hift_rt.optimizer"]
    # The package's __init__ re-exports its modules; a module importing the package itself (as
    # methods.py does for hift_rt.wrap) goes through it, so circles through "hift_rt" count too.
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))
