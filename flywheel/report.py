"""The per-generation table of a run, as the CharacterFlywheel report shows it.

One row per generation: the candidate and its recipe, offline metrics (reward-model win
rate raw and style-controlled, held-out instruction following and violation rate, style),
the oracle's view (gold utility of the candidate vs its parent on held-out users), the A/B
lifts of engagement breadth and depth with their confidence intervals, and the decision
(ship / hold / gated). Written as

- ``RUN_DIR/generations.json`` (built by ``document``, rewritten atomically),
- ``RUN_DIR/generations.md`` (the Markdown table, then each generation's reason and gates),
- ``RUN_DIR/plots/*.png``: lift per generation with CIs, steerability trend, style drift,
  reward-model win rates raw vs style-controlled.

``flywheel report RUN_DIR`` prints the table again from ``generations.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flywheel.persist import atomic_write_text
from flywheel.records import (
    RECORD_VERSION,
    ABSummary,
    GenerationRecord,
    Interval,
    gate_verdict,
    read_records,
)
from flywheel.store import fallback_text

SCHEMA_VERSION = RECORD_VERSION
JSON_FILE = "generations.json"
MARKDOWN_FILE = "generations.md"
PLOTS_DIR = "plots"
LIFT_METRICS = ("breadth", "depth")
# What the readers below take: records as the ledger and generations.json hold them, or typed.
Records = Sequence[Mapping[str, Any] | GenerationRecord]
# The terminal table drops the style columns and the deployed model (the Markdown has all).
TERMINAL_COLUMNS = (
    "gen",
    "candidate",
    "recipe",
    "RM win (raw / SC)",
    "instr. following",
    "violations",
    "gates",
    "gold vs parent [95% CI]",
    "breadth lift [95% CI]",
    "depth lift [95% CI]",
    "decision",
)


def _num(value: Any, spec: str = ".2f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _interval(interval: Interval | None, spec: str) -> str:
    """'+3.1% [-1.0%, +7.2%]' with every number formatted by ``spec``, '-' without one."""
    if interval is None:
        return "-"
    low, high = _num(interval.ci_low, spec), _num(interval.ci_high, spec)
    return f"{interval.estimate:{spec}} [{low}, {high}]"


def _lift(ab: ABSummary | None, metric: str) -> str:
    """'+3.1% [-1.0%, +7.2%]' for a metric of a generation's A/B test, '-' without one."""
    return _interval(None if ab is None else ab.lift(metric), "+.1%")


def table_rows(records: Records) -> list[dict[str, str]]:
    """One display row per generation record (strings, ready for any table renderer)."""
    rows = []
    for r in read_records(records):
        off = r.offline
        # The deployed model's offline metrics are the candidate's keys prefixed parent_.
        parent = {k.removeprefix("parent_"): v for k, v in off.items() if k.startswith("parent_")}
        style, parent_style = off.get("style") or {}, parent.get("style") or {}
        rows.append(
            {
                "gen": str(r.generation),
                "candidate": r.candidate,
                "recipe": r.recipe,
                "RM win (raw / SC)": f"{_num(off.get('rm_win_rate'))} / "
                f"{_num(off.get('rm_win_rate_style_controlled'))}",
                "instr. following": _change(parent, off, "instruction_following", ".1%"),
                "violations": _change(parent, off, "violation_rate", ".1%"),
                "words": _change(parent_style, style, "mean_words", ".0f"),
                "emoji": _change(parent_style, style, "emoji_rate", ".0%"),
                "gates": "pass"
                if r.passed_gates
                else ", ".join(_gate_short(g) for g in r.gates if not g["passed"]),
                "gold vs parent [95% CI]": _interval(r.gold_vs_parent, "+.2f"),
                "breadth lift [95% CI]": _lift(r.ab, "breadth"),
                "depth lift [95% CI]": _lift(r.ab, "depth"),
                "decision": r.decision,
                "deployed after": r.deployed_after,
            }
        )
    return rows


def _change(deployed: Mapping[str, Any], candidate: Mapping[str, Any], key: str, spec: str) -> str:
    """'deployed -> candidate' of one metric, each formatted with ``spec``."""
    return f"{_num(deployed.get(key), spec)} -> {_num(candidate.get(key), spec)}"


def _gate_short(gate: Mapping[str, Any]) -> str:
    """A gate that did not pass, in the table: its name, '?' when it could not tell."""
    return f"{gate['name']}?" if gate_verdict(gate) == "inconclusive" else gate["name"]


def markdown(scenario: str, records: Records) -> str:
    """The Markdown report: the table, then each generation's reason and gates."""
    records = read_records(records)
    rows = table_rows(records)
    lines = [f"# Flywheel run: {scenario}", ""]
    if not rows:
        return "\n".join([*lines, "No generation has been decided yet.", ""])
    headers = list(rows[0])
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines.extend("| " + " | ".join(row[h] for h in headers) + " |" for row in rows)
    lines.append("")
    lines.append(
        "RM win: share of held-out logged contexts where the naive / style-controlled reward "
        "model prefers the candidate's reply to the deployed model's. Instruction following "
        "and violations: held-out characters with instructions training never saw (deployed "
        "-> candidate). Gold vs parent: the ORACLE's mean gold utility of the candidate's "
        "replies minus the deployed model's on the same held-out logged contexts, for the users "
        "who wrote them (paired t interval; shown, never decided on). Lifts: relative A/B lift "
        "with 95% CI (CUPED-adjusted; the twin estimate in a twin test)."
    )
    for r in records:
        lines += ["", f"## Generation {r.generation}: {r.candidate} ({r.decision})", ""]
        lines.append(r.reason)
        lines.append("")
        for gate in r.gates:
            mark = "pass" if gate["passed"] else f"**{gate_verdict(gate).upper()}**"
            lines.append(f"- gate `{gate['name']}`: {mark}: {gate['reason']}")
        lines.extend(_fallback_lines(r))
        for c in r.candidates:
            if c.candidate == r.candidate:
                continue
            verdict = "passed gates" if c.passed_gates else "failed gates"
            lines.append(
                f"- other candidate `{c.candidate}` ({c.recipe}): {verdict}, "
                f"RM win {_num(c.rm_win_rate)} / {_num(c.rm_win_rate_style_controlled)}"
            )
    return "\n".join(lines) + "\n"


def _fallback_lines(record: GenerationRecord) -> list[str]:
    """How often the generation's simulated users fell back to canned human messages."""
    blocks = (("traffic", record.traffic), ("A/B", record.ab))
    shares = [
        f"{label} {fallback_text(block.user_fallbacks)}"
        for label, block in blocks
        if block is not None and block.user_fallbacks
    ]
    if not shares:
        return []
    return [
        "- simulated-user fallbacks (unusable user-LLM output replaced by a human message): "
        + "; ".join(shares)
    ]


def text_table(records: Records) -> str:
    """The table rendered by rich for a terminal (plain text, no colour codes, 170 wide)."""
    from rich.console import Console
    from rich.table import Table

    rows = [{k: v for k, v in row.items() if k in TERMINAL_COLUMNS} for row in table_rows(records)]
    table = Table(title="Generations", show_lines=False)
    for header in TERMINAL_COLUMNS:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(row[h] for h in TERMINAL_COLUMNS))
    console = Console(width=170, record=True, force_terminal=False, color_system=None)
    with console.capture() as capture:
        console.print(table)
    return capture.get()


def document(scenario: Any, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``generations.json`` document: schema version, scenario, seed, base, generations."""
    return {
        "schema_version": SCHEMA_VERSION,
        "scenario": scenario.name,
        "seed": scenario.seed,
        "base": {"name": "gen0-base", "policy": scenario.policy.model_dump(mode="json")},
        "generations": list(records),
    }


def write_outputs(
    run_dir: str | Path, scenario: Any, records: Sequence[Mapping[str, Any]], *, plots: bool = False
) -> dict[str, Path]:
    """Write generations.json and generations.md (and the plots) into ``run_dir``."""
    run_dir = Path(run_dir)
    paths = {"json": run_dir / JSON_FILE, "markdown": run_dir / MARKDOWN_FILE}
    text = json.dumps(document(scenario, records), indent=2, allow_nan=False, default=float)
    atomic_write_text(paths["json"], text + "\n")
    atomic_write_text(paths["markdown"], markdown(scenario.name, records))
    if plots and records:
        paths.update(write_plots(records, run_dir / PLOTS_DIR))
    return paths


def read_document(run_dir: str | Path) -> dict[str, Any]:
    """Read ``RUN_DIR/generations.json``; a clear error when the run has none."""
    path = Path(run_dir) / JSON_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; run `flywheel run SCENARIO --out {run_dir}` first "
            f"(it is written after each generation)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def write_plots(records: Records, folder: Path) -> dict[str, Path]:
    """PNG plots of a run: lifts with CIs, steerability, style drift, RM win rates."""
    import matplotlib

    matplotlib.use("Agg")
    records = read_records(records)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "lift_plot": _save(_lift_figure(records), folder / "lift.png"),
        "steerability_plot": _save(_steerability_figure(records), folder / "steerability.png"),
        "style_plot": _save(_style_figure(records), folder / "style.png"),
        "win_rate_plot": _save(_win_rate_figure(records), folder / "rm_win_rate.png"),
    }


def _lift_figure(records: Sequence[GenerationRecord]) -> Any:
    """A/B lift of breadth and depth per generation, with the CI as error bars."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for offset, metric in zip((-0.1, 0.1), LIFT_METRICS, strict=True):
        xs, ys, lo, hi = [], [], [], []
        for r in records:
            lift = None if r.ab is None else r.ab.lift(metric)
            if lift is None:
                continue
            # A missing CI bound draws no bar on that side.
            low = lift.estimate if lift.ci_low is None else lift.ci_low
            high = lift.estimate if lift.ci_high is None else lift.ci_high
            xs.append(r.generation + offset)
            ys.append(100 * lift.estimate)
            lo.append(100 * (lift.estimate - low))
            hi.append(100 * (high - lift.estimate))
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", capsize=4, label=f"{metric} lift")
    ax.axhline(0, color="grey", lw=0.8)
    for r in records:
        ax.annotate(
            r.decision,
            (r.generation, 0),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=8,
            color="grey",
        )
    ax.set_xticks([r.generation for r in records])
    ax.set_xlabel("generation")
    ax.set_ylabel("A/B lift, % (95% CI)")
    ax.set_title("Engagement lift per generation")
    ax.legend()
    return fig


def _steerability_figure(records: Sequence[GenerationRecord]) -> Any:
    """Held-out instruction following and violation rate, deployed vs candidate."""
    import matplotlib.pyplot as plt

    gens = [r.generation for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (
        ("instruction_following", "instruction following"),
        ("violation_rate", "violation rate"),
    ):
        deployed = [r.offline.get(f"parent_{key}") for r in records]
        ax.plot(gens, deployed, "o--", label=f"{label} (deployed)")
        ax.plot(gens, [r.offline.get(key) for r in records], "o-", label=f"{label} (candidate)")
    ax.set_xticks(gens)
    ax.set_ylim(0, 1)
    ax.set_xlabel("generation")
    ax.set_title("Steerability on held-out characters")
    ax.legend(fontsize=7)
    return fig


def _style_figure(records: Sequence[GenerationRecord]) -> Any:
    """Words, emoji rate and question rate of the deployed and the candidate model."""
    import matplotlib.pyplot as plt

    gens = [r.generation for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax, key in zip(axes, ("mean_words", "emoji_rate", "question_rate"), strict=True):
        deployed = [(r.offline.get("parent_style") or {}).get(key) for r in records]
        candidate = [(r.offline.get("style") or {}).get(key) for r in records]
        ax.plot(gens, deployed, "o--", label="deployed")
        ax.plot(gens, candidate, "o-", label="candidate")
        ax.set_title(key.replace("_", " "))
        ax.set_xticks(gens)
    axes[0].legend(fontsize=7)
    fig.suptitle("Style drift (held-out logged contexts)")
    return fig


def _win_rate_figure(records: Sequence[GenerationRecord]) -> Any:
    """The reward models' win rate of the candidate over the deployed model, raw and
    style-controlled."""
    import matplotlib.pyplot as plt

    gens = [r.generation for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (
        ("rm_win_rate", "raw (naive RM)"),
        ("rm_win_rate_style_controlled", "style-controlled RM"),
    ):
        ax.plot(gens, [r.offline.get(key) for r in records], "o-", label=label)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xticks(gens)
    ax.set_ylim(0, 1)
    ax.set_xlabel("generation")
    ax.set_title("Reward-model win rate vs deployed")
    ax.legend()
    return fig


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
