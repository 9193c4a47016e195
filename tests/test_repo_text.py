"""The project's code and docs speak of the project alone.

Every text file outside ``tests/`` (code, docstrings, comments, docs, scenario and config
files) must be readable on anyone's clone: no absolute path of one machine (a work folder,
a temporary folder where a run happened to land), no labels of private runs (``run``
followed by a number) that exist on no one else's disk, no diary of which work session did what,
and no reference to a design note that is not in the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = (
    "benchmarks",
    "dashboards",
    "flywheel",
    "policies",
    "rewards",
    "scenarios",
    "sim",
    "training",
)
SCANNED_FILES = ("README.md", "Makefile", "pyproject.toml")
SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".cfg", ".txt", ".json"}

# Each pattern with why it does not belong in the project's text.
FORBIDDEN = {
    "an absolute path of one machine": re.compile(r"(?<![\w.])/(tmp|work|root|home|Users)/"),
    "a private run label": re.compile(r"\b(grpo_)?run\d+\b|\bruns? \d+-\d+\b"),
    "a work-session diary": re.compile(
        r"\b(first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth) session\b",
        re.IGNORECASE,
    ),
}
# Upper-case Markdown names (README.md, DESIGN.md, *_CONTRACT.md) name documents; lower-case
# ones (report.md, generations.md) are files the code writes.
DOC_REFERENCE = re.compile(r"\b[A-Z][A-Z0-9_]*\.md\b")


def scanned_files(root: Path) -> list[Path]:
    """The text files the rule covers, relative paths sorted."""
    files = [root / name for name in SCANNED_FILES if (root / name).is_file()]
    for folder in SCANNED_DIRS:
        files += [
            p
            for p in (root / folder).rglob("*")
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts
        ]
    return sorted(files)


def offending_lines(root: Path) -> list[str]:
    """``path:line: what: text`` for every line that breaks the rule."""
    documents = {p.name for p in root.glob("*.md")}
    for folder in (*SCANNED_DIRS, "tests"):
        documents |= {p.name for p in (root / folder).rglob("*.md")}
    found = []
    for path in scanned_files(root):
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), start=1):
            where = f"{path.relative_to(root)}:{number}"
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    found.append(f"{where}: {what}: {line.strip()}")
            for name in DOC_REFERENCE.findall(line):
                if name not in documents:
                    found.append(f"{where}: {name} is not in the repository: {line.strip()}")
    return found


def test_code_and_docs_name_no_machine_path_private_run_or_missing_document() -> None:
    found = offending_lines(ROOT)
    assert not found, (
        "text that only makes sense on one machine or in one work history; say what the code "
        "does and why, use relative runs/... paths, name configurations by their flags, and "
        "put measurements in benchmarks/README.md:\n" + "\n".join(found)
    )


def test_the_rule_catches_each_kind(tmp_path: Path) -> None:
    (tmp_path / "benchmarks").mkdir()
    # The offending text is assembled here so that this file does not itself carry it.
    machine_path, label = "/" + "work/", "grpo_" + "run" + "17"
    diary = "The " + "seventh" + " session's recipe, as in " + "runs" + " 16-18.\n"
    (tmp_path / "benchmarks" / "README.md").write_text(
        f"    python benchmarks/x.py --out {machine_path}{label}\n"
        + diary
        + "Schema in GENERATIONS_CONTRACT.md; see README.md; writes report.md.\n"
    )
    found = offending_lines(tmp_path)
    kinds = [line.split(": ")[1] for line in found]
    assert kinds.count("an absolute path of one machine") == 1
    assert kinds.count("a private run label") == 2  # the label and the numbered range
    assert kinds.count("a work-session diary") == 1
    assert kinds.count("GENERATIONS_CONTRACT.md is not in the repository") == 1
    assert len(found) == 5  # README.md exists, report.md is an output name


def _share(share: float) -> str:
    """How the README writes a treatment share: 50/50, or a percentage."""
    return "50/50" if share == 0.5 else f"{share:.0%}"


def test_readme_states_each_scenarios_ab_design() -> None:
    """The README's scenario table says what each file simulates: users, pre-period + test
    days and treatment share of its A/B test, as the TOML has them."""
    import tomllib

    readme = (ROOT / "README.md").read_text()
    rows = {line.split("`")[1]: line for line in readme.splitlines() if line.startswith("| `")}
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        assert path.name in rows, f"README's scenario table has no row for {path.name}"
        traffic = tomllib.loads(path.read_text()).get("traffic")
        if traffic is None:
            continue
        design = (
            f"{traffic['n_users']:,} users, {traffic['pre_days']} + {traffic['test_days']} days"
        )
        row = rows[path.name]
        assert design in row, f"README row of {path.name} should say {design!r}: {row}"
        assert _share(traffic["treatment_share"]) in row, (path.name, row)
