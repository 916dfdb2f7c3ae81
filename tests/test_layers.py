"""The package's imports run one way: spec -> data -> model -> parallel -> train ->
serving -> cli/jobs. Walks every import statement of every module (function-level
imports included) and fails on one that reaches a higher layer."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "rocketrec"

# module path prefix (under rocketrec/) -> layer; the longest matching prefix wins
LAYERS = {
    "__init__": 0,
    "quiet": 0,
    "spec": 0,
    "data": 1,
    "model": 2,
    "parallel": 3,
    "train": 4,
    "serving": 5,
    "evaluation": 6,
    "cli": 6,
    "cli_models": 6,
    "config": 6,
    "run_config": 6,
    "runs": 6,
    "ray_train": 6,
}


def _layer(dotted: str) -> int:
    """'rocketrec.train.loop' -> 4; 'rocketrec' -> 0."""
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
    assert upward_imports() == ["rocketrec/model/m.py:2 imports rocketrec.train.loop (layer 4 > 2)"]


def test_no_big_files_or_functions():
    """No module in rocketrec/ over 450 lines, no function over 80."""
    big = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 450:
            big.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > 80:
                    big.append(f"{path.name}:{node.lineno} {node.name}: {n} lines")
    assert not big, "\n".join(big)
