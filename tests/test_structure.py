"""The package's shape: no import cycles, no stage importing another stage, no function too long to read.

Imports are read from the source (every `import` and `from ... import`, at the top of a module, inside a
function or under TYPE_CHECKING alike), so the checks need no model and run in a blink.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "chatrlhf"

# modules that implement a command's stage; each may use the library below it, never another stage
STAGES = {
    "chatrlhf.sft",
    "chatrlhf.reward",
    "chatrlhf.ppo",
    "chatrlhf.dpo",
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


MAX_FILE_LINES = 450


def test_no_file_longer_than_the_limit():
    long = [
        f"{p.relative_to(PACKAGE)} ({n} lines)"
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_FILE_LINES
    ]
    assert not long, long


# --------------------------------------------------------------------------------------------------
# every key a command accepts is a key it reads


def _chains(tree: ast.Module) -> set[tuple[str, ...]]:
    """Every attribute chain read in a module, `cfg.data.max_length` -> (cfg, data, max_length), with a
    local alias (`d = cfg.data`) expanded, a parameter annotated with a class as `@Class`; plus each string constant as a 1-chain (`getattr(cfg, name)` over
    a tuple of key names)."""
    aliases: dict[str, tuple[str, ...]] = {}

    def chain(node: ast.AST) -> tuple[str, ...] | None:
        names: list[str] = []
        while isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        return (*aliases.get(node.id, (node.id,)), *reversed(names))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in node.args.args + node.args.kwonlyargs:
                if isinstance(arg.annotation, ast.Name):  # `lora: LoraConfig` reads as a LoraConfig
                    aliases[arg.arg] = (f"@{arg.annotation.id}",)
    for node in ast.walk(tree):
        simple = (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        )
        if simple and isinstance(node.value, ast.Attribute) and (c := chain(node.value)):
            aliases[node.targets[0].id] = c
    found = {c for node in ast.walk(tree) if isinstance(node, ast.Attribute) and (c := chain(node))}
    found |= {(n.value,) for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return found


def _reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph[name]
    return seen


def _unread_keys(cls: type, chains: set[tuple[str, ...]], commands: set[type], prefix=()) -> list[str]:
    """Keys of `cls` no chain reads: a key `a.b` needs a read ending in (a, b), a top-level key any read
    of it as an attribute; a section that is itself a command's config (the pipeline's `sft`) is checked
    as that command's."""
    unread = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ, path = hints[f.name], (*prefix, f.name)
        if dataclasses.is_dataclass(typ):
            inner = () if typ in commands else path
            unread += [f"{f.name}.{k}" for k in _unread_keys(typ, chains, commands, inner)]
            continue
        if len(path) == 1:  # read as an attribute of anything, or named in a string (getattr)
            read = (f.name,) in chains or any(len(c) > 1 and c[-1] == f.name for c in chains)
        else:  # read through its section, or through a parameter annotated with the section's class
            read = any(c[-2:] in {path[-2:], (f"@{cls.__name__}", f.name)} for c in chains)
        if not read:
            unread.append(f.name)
    return unread


def test_every_config_key_of_every_command_is_read_by_that_command():
    from chatrlhf.cli import BENCHMARKS, COMMANDS

    graph, modules = import_graph(), _modules()
    every = {**COMMANDS, **{f"eval --benchmark {name}": c for name, c in BENCHMARKS.items()}}
    commands = {c.config_class() for c in every.values()}
    unread = {}
    for name, command in every.items():
        reach = _reachable(command.module, graph) - {m for m in graph if m.startswith("chatrlhf.configs")}
        chains = set().union(*(_chains(modules[m]) for m in reach))
        if keys := _unread_keys(command.config_class(), chains, commands):
            unread[name] = keys
    assert not unread, unread


@dataclasses.dataclass
class _Section:
    used: int = 0
    unused: int = 0


@dataclasses.dataclass
class _Config:
    section: _Section = dataclasses.field(default_factory=_Section)
    top: int = 0


def test_the_key_check_finds_a_key_nobody_reads():
    chains = _chains(ast.parse("def f(cfg):\n    s = cfg.section\n    return s.used + cfg.top"))
    assert _unread_keys(_Config, chains, set()) == ["section.unused"]
    assert _unread_keys(_Config, chains | {("cfg", "section", "unused")}, set()) == []


def test_train_state_holds_no_untyped_dict():
    from chatrlhf.harness import TrainState

    for f in dataclasses.fields(TrainState):
        hint = typing.get_type_hints(TrainState)[f.name]
        args = typing.get_args(hint)
        assert not (typing.get_origin(hint) is dict and typing.Any in args), f"TrainState.{f.name}: {hint}"
