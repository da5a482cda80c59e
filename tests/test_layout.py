"""The package's layout rules, read from the source: subpackages import each other without a cycle, no file is over
500 lines, and the engine's state travels as data."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mlkv"
MAX_LINES = 500


def unit_of(module: str) -> str | None:
    """The subpackage or top-level module of ``mlkv.a.b`` (``"a"``); ``None`` for the root package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mlkv" else None


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top, inside functions or under ``TYPE_CHECKING`` alike."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            found.add(".".join(base + ([node.module] if node.module else [])))
    return found


def import_graph() -> dict[str, set[str]]:
    """``{unit: units it imports}`` over the units of ``mlkv`` (subpackages and top-level modules)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        source = unit_of(module_name(path))
        if source is None:
            continue
        targets = {unit_of(m) for m in imported_modules(path)} - {None, source}
        graph.setdefault(source, set()).update(targets)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(path: list[str]) -> list[str] | None:
        state[path[-1]] = "open"
        for nxt in sorted(graph.get(path[-1], ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(path + [nxt])):
                return cycle
        state[path[-1]] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit([start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_dag():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_known_edges():
    graph = import_graph()
    assert {"files", "checkpoints"} <= graph["data"]
    assert "data" in graph["model"]  # model/loading.py loads the tokenizer
    assert graph.get("files", set()) <= {"errors"}


def test_subpackages_import_each_other_without_a_cycle():
    assert find_cycle(import_graph()) is None


def test_no_source_file_is_over_500_lines():
    lines = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {name: n for name, n in lines.items() if n > MAX_LINES} == {}


def writes(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, target)`` of every assignment and mutating dict call (``x.setdefault(...)``, ``x.update(...)``...)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [(node.lineno, ast.unparse(t)) for t in targets]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            found.append((node.lineno, ast.unparse(node.func.value) + "[...]"))
    return sorted(found)


MUTATORS = {"setdefault", "update", "pop", "popitem", "clear", "__setitem__"}


def test_nothing_registers_into_the_model_or_flips_its_attention_implementation():
    """The engine's attention and backend are passed to the model, not installed in it: no module writes into the
    model's attention registry or sets a config's attention implementation (tests may, to pick eager or sdpa)."""
    offenders = [f"{path.relative_to(SRC)}:{line} {target}" for path in SRC.rglob("*.py")
                 for line, target in writes(ast.parse(path.read_text(), str(path)))
                 if target.endswith("_attn_implementation") or target.startswith("ATTENTION_FUNCTIONS[")]
    assert offenders == []


def test_the_write_finder_sees_a_registration_and_a_config_flip():
    code = "ATTENTION_FUNCTIONS.setdefault('x', f)\nconfig._attn_implementation = 'x'\nATTENTION_FUNCTIONS['y'] = f"
    assert writes(ast.parse(code)) == [(1, "ATTENTION_FUNCTIONS[...]"), (2, "config._attn_implementation"),
                                       (3, "ATTENTION_FUNCTIONS['y']")]
