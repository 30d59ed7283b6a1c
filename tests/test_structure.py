"""The package's shape: no import cycles, no stage importing another stage, no function too long to read.

Imports are read from the source (every `import` and `from ... import`, at the top of a module, inside a
function or under TYPE_CHECKING alike), so the checks need no model and run in a blink.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "chatrlhf"

# modules that implement a command's stage; each may use the library below it, never another stage
STAGES = {
    "chatrlhf.sft",
    "chatrlhf.reward",
    "chatrlhf.ppo",
    "chatrlhf.sample",
    "chatrlhf.eval",
    "chatrlhf.labeling.auto",
}
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from chatrlhf import ppo` imports the module chatrlhf.ppo
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found - {"chatrlhf"}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "chatrlhf.forward" in graph and graph["chatrlhf.ppo"], "the graph was not read"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_stage_imports_another_stage():
    graph = import_graph()
    assert set(graph) >= STAGES
    crossing = {(a, b) for a in STAGES for b in graph[a] if b in STAGES}
    assert not crossing, crossing


def test_the_pipeline_and_demo_import_configs_not_stage_implementations_at_the_top():
    """`chatrlhf pipeline --help` and the demo's config need no torch: the stages are imported only where run."""
    modules = _modules()
    for name in ("chatrlhf.pipeline", "chatrlhf.demo", "chatrlhf.cli"):
        top = {
            node.module
            for node in modules[name].body
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatrlhf")
        }
        assert not top & STAGES, (name, top & STAGES)


def test_no_function_longer_than_the_limit():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_ppo_train_reads_as_a_short_loop():
    tree = ast.parse((PACKAGE / "ppo.py").read_text(encoding="utf-8"))
    (train,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    assert train.end_lineno - train.lineno + 1 < 60
