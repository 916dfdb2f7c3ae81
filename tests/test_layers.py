"""The package's imports run one way: spec -> data -> model -> parallel -> checkpoint ->
train -> serving -> evaluation/cli/run. Walks every import statement of every module (function-level
imports included) and fails on one that reaches a higher layer."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rocketrec"

# module path prefix (under rocketrec/) -> layer; the longest matching prefix wins
LAYERS = {
    "__init__": 0,
    "errors": 0,
    "settings": 0,
    "quiet": 0,
    "spec": 0,
    "data": 1,
    "model": 2,
    "parallel": 3,
    "checkpoint": 4,
    "train": 5,
    "serving": 6,
    "evaluation": 7,
    "cli": 7,
    "run": 7,
    # the names of the files under RUN/ (no imports of its own): every layer may use them
    "run/run_dir": 0,
}


def _layer(dotted: str) -> int:
    """'rocketrec.train.loop' -> 5; 'rocketrec' -> 0."""
    parts = dotted.split(".")[1:] or ["__init__"]
    for n in range(len(parts), 0, -1):
        key = "/".join(parts[:n])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"module {dotted} has no layer: add it to LAYERS")


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    pkg = ".".join(("rocketrec", *path.relative_to(PKG).with_suffix("").parts[:-1]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("rocketrec")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.startswith("rocketrec"):
                out.append((node.lineno, mod))
    return out


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        me = ".".join(("rocketrec", *rel.parts))
        mine = _layer(me if rel.name != "__init__" else me.rsplit(".", 1)[0])
        for line, mod in _imports(path):
            if _layer(mod) > mine:
                bad.append(
                    f"rocketrec/{rel}.py:{line} imports {mod} (layer {_layer(mod)} > {mine})"
                )
    return bad


def test_imports_run_one_way():
    bad = upward_imports()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_the_walker_sees_an_upward_import(tmp_path, monkeypatch):
    """The check itself can fail: a planted upward import is reported."""
    fake = tmp_path / "rocketrec"
    (fake / "model").mkdir(parents=True)
    (fake / "model" / "m.py").write_text("def f():\n    from rocketrec.train.loop import train\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert upward_imports() == ["rocketrec/model/m.py:2 imports rocketrec.train.loop (layer 5 > 2)"]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(("rocketrec", *parts))


def _runtime_imports(path: Path) -> set[str]:
    """Modules of rocketrec that `path` imports when it runs (function-level imports
    included; `if TYPE_CHECKING:` blocks not: they never execute)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for b in node.body for n in ast.walk(b)}
    me = _module_name(path)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rocketrec")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.startswith("rocketrec"):
                out.add(mod)
                # `from pkg import sub` imports the submodule when there is one
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def import_cycles() -> list[list[str]]:
    """Cycles in the graph of rocketrec modules importing each other (each once)."""
    mods = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}
    graph = {
        m: sorted(i for i in _runtime_imports(p) if i in mods and i != m) for m, p in mods.items()
    }
    cycles, seen = [], set()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                cyc = stack[stack.index(n) :]
                key = frozenset(cyc)
                if key not in seen:
                    seen.add(key)
                    cycles.append([*cyc, n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    return cycles


def test_no_import_cycles():
    """No two modules import each other, directly or through others (the layer rule
    sees only upward imports; a cycle inside a layer is caught here)."""
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_sees_a_planted_cycle(tmp_path, monkeypatch):
    fake = tmp_path / "rocketrec"
    (fake / "train").mkdir(parents=True)
    (fake / "train" / "a.py").write_text("from rocketrec.train.b import x\n")
    (fake / "train" / "b.py").write_text("def x():\n    from rocketrec.train import a\n")
    (fake / "train" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rocketrec.train.a import y\n"
    )
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert import_cycles() == [["rocketrec.train.a", "rocketrec.train.b", "rocketrec.train.a"]]


def test_files_and_functions_stay_readable():
    """The size rule is a guide: one concept per file. A module over 600 lines says in its
    docstring why it is one concept (a line 'One concept: ...'); no function over 80 lines."""
    big = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        doc = ast.get_docstring(tree) or ""
        if text.count("\n") > 600 and "One concept:" not in doc:
            big.append(
                f"{path.name}: {text.count(chr(10))} lines, no 'One concept:' in its docstring"
            )
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > 80:
                    big.append(f"{path.name}:{node.lineno} {node.name}: {n} lines")
    assert not big, "\n".join(big)


def test_test_files_that_need_one_process_are_grouped():
    """`make test` runs the suite in two processes (pytest-xdist): a test file with
    module-scoped fixtures, or one that starts Ray, must be listed in conftest.py, or its
    fixtures are built twice and Ray clusters meet; the scheduler keeps each in one process."""
    from conftest import MODULE_FIXTURE_FILES, RAY_FILES, _scope

    tests = Path(__file__).resolve().parent
    for f in sorted(tests.glob("test_*.py")):
        if f.name == Path(__file__).name:
            continue
        text = f.read_text()
        starts_ray = (
            "import ray" in text
            or "ray_two_node" in text
            or ('"ads_train.py"' in text and '"--workers"' in text)
        )
        if starts_ray:
            assert f.name in RAY_FILES, f"{f.name} starts Ray: add it to conftest.RAY_FILES"
        if 'scope="module"' in text:
            assert f.name in MODULE_FIXTURE_FILES | RAY_FILES, f"{f.name}: add it to conftest.py"
    assert _scope("tests/test_follow.py::t") == _scope("tests/test_ray.py::u[1]") == "ray"
    assert _scope("tests/test_cpp.py::a") == _scope("tests/test_cpp.py::b[x]")
    assert _scope("tests/test_dist.py::a") != _scope("tests/test_dist.py::b")
