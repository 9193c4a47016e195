"""The packages' dependency direction (README.md, "Layout"), enforced on every import.

``policies <- rewards <- sim / training <- flywheel <- dashboards``: reward and training
code never imports the simulator (where the oracle lives) or the flywheel, and the model
backends import none of the others. Imports inside functions count too: a lazy import of
``sim`` from ``rewards`` would let a reward model reach the gold utility just the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("policies", "rewards", "training", "sim", "flywheel", "dashboards")

# Which of the project's packages each package may import (its own is always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "policies": frozenset(),
    "rewards": frozenset({"policies"}),
    "training": frozenset({"rewards", "policies"}),
    "sim": frozenset({"rewards", "policies"}),
    "flywheel": frozenset({"sim", "training", "rewards", "policies"}),
    "dashboards": frozenset({"flywheel", "sim", "training", "rewards", "policies"}),
}
# The one upward edge: `flywheel dashboard` launches the Streamlit app by its path.
EXCEPTIONS = {("flywheel/cli.py", "dashboards")}


def imported_packages(source: str) -> set[str]:
    """Top-level names of every absolute import in ``source``, at any depth of the code."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def violations(root: Path) -> list[str]:
    """``file -> package`` for each import of one of the project's packages that its
    package may not make."""
    found = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            for name in imported_packages(path.read_text(encoding="utf-8")):
                if name not in PACKAGES or name == package or name in ALLOWED[package]:
                    continue
                if (relative, name) not in EXCEPTIONS:
                    found.append(f"{relative} -> {name}")
    return found


def test_every_import_points_down_the_layers() -> None:
    assert violations(ROOT) == []


def test_the_rule_catches_an_upward_import_even_inside_a_function(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    (tmp_path / "rewards" / "leaky.py").write_text(
        "def peek():\n    from sim.gold import utility_terms\n    return utility_terms\n"
    )
    (tmp_path / "policies" / "base.py").write_text("import rewards.checkers\n")
    (tmp_path / "training" / "ok.py").write_text("from rewards import checkers\nimport numpy\n")
    assert violations(tmp_path) == ["policies/base.py -> rewards", "rewards/leaky.py -> sim"]
