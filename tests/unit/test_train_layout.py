"""The training core stays findable: no module of nvembed_sdk/train over 400 lines, no import cycle among them."""

from __future__ import annotations

import ast
from pathlib import Path

import nvembed_sdk.train

TRAIN = Path(nvembed_sdk.train.__file__).resolve().parent
MAX_LINES = 400  # the aim is about 350; the margin keeps small fixes from tripping it


def _train_imports(path: Path) -> set[str]:
    """The nvembed_sdk.train modules ``path`` imports, anywhere in the file (function-level imports
    included) except under ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.startswith("nvembed_sdk.train."):
                mod = name.split(".")[2]
                if (TRAIN / f"{mod}.py").is_file() and mod != path.stem:
                    out.add(mod)
    return out


def test_no_train_module_is_too_long():
    long = {p.name: n for p in TRAIN.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules by job: {long}"


def test_no_import_cycle_among_train_modules():
    graph = {p.stem: _train_imports(p) for p in TRAIN.glob("*.py")}
    assert graph["mining"] and graph["distill"], "the import scan found nothing: check _train_imports"
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [node, dep]))
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("from nvembed_sdk.train.b import x\n")
    (tmp_path / "b.py").write_text("def f():\n    from nvembed_sdk.train import a\n")
    monkeypatch.setattr(f"{__name__}.TRAIN", tmp_path)
    assert _train_imports(tmp_path / "a.py") == {"b"} and _train_imports(tmp_path / "b.py") == {"a"}
