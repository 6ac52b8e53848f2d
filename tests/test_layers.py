"""Each layer imports only the ones below it: models → hooks → interventions → api → eval → cli.

Every import counts: at module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import attnkit

ROOT = Path(attnkit.__file__).parent
LEVELS = {"models": 0, "hooks": 1, "interventions": 2, "api": 3, "eval": 4, "integrations": 4, "synth": 4,
          "testing": 4, "cli": 5}


def _level(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "attnkit":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in ("__init__", "api"):
        return LEVELS["api"]          # ``import attnkit`` is the public API
    return LEVELS[parts[1]]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "attnkit"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "attnkit":
            out.append(node.module)
    return out


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        if "assets" in rel.parts:
            continue
        own = LEVELS["api"] if module in ("attnkit.__init__", "attnkit.api") else _level(module)
        bad += [f"{module} imports {imp}" for imp in _imports(path) if _level(imp) > own]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_check_sees_a_violation(tmp_path):
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from attnkit.api import wrap\n")
    assert _imports(path) == ["attnkit.api"] and _level("attnkit.api") > LEVELS["hooks"]
