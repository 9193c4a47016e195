"""The ``flywheel`` command line.

Each command imports its heavy modules inside the function body so that ``flywheel --help``
answers in well under a second.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Rehearse a character-chat LLM improvement flywheel in simulation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
models_app = typer.Typer(help="Prepare the packaged default models.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("prepare")
def models_prepare() -> None:
    """Convert the packaged SmolLM2 GGUF into a cached HF checkpoint and locate MiniLM."""
    from policies import models

    models.prepare_all(verbose=True)


@app.command("analyze")
def analyze(
    table: str = typer.Argument(
        ..., help="User-day table, .parquet/.pq or .csv (columns: see flywheel.metrics)."
    ),
    out: str = typer.Option(..., "--out", help="Folder for result.json, report.md and plots."),
    aa: int = typer.Option(0, "--aa", min=0, help="A/A re-randomisations to run (0 = none)."),
    treatment_share: float = typer.Option(
        0.5, "--treatment-share", help="Designed share of users in treatment (SRM check)."
    ),
    alpha: float = typer.Option(0.05, "--alpha", help="Two-sided test level; CIs at 1 - alpha."),
    correction: str = typer.Option(
        "holm", "--correction", help="statsmodels multipletests method, per metric family."
    ),
    retention_day: int = typer.Option(1, "--retention-day", help="Retention: active k days later."),
    cuped: bool = typer.Option(True, "--cuped/--no-cuped", help="Adjust with the pre-period."),
    seed: int = typer.Option(0, "--seed", help="Seed of the A/A re-randomisations."),
) -> None:
    """Analyse an A/B test from a user-level table: lifts, CUPED, SRM, guardrails, decision."""
    from flywheel.ab import AnalysisConfig, aa_test
    from flywheel.ab import analyze as run_analysis
    from flywheel.ab_report import write_report
    from flywheel.metrics import aggregate_users, load_table

    try:
        config = AnalysisConfig(
            alpha=alpha, treatment_share=treatment_share, correction=correction,
            retention_day=retention_day, cuped=cuped,
        )  # fmt: skip
        frame = load_table(table)
        users = aggregate_users(frame)
        result = run_analysis(users, config)
    except (FileNotFoundError, ValueError) as err:
        # A bad table is the user's to fix: show the message, not a traceback.
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    typer.echo(result.summary())
    aa_result = aa_test(users, aa, seed=seed, config=config, progress=True) if aa else None
    if aa_result is not None:
        typer.echo(aa_result.summary())
    paths = write_report(result, frame, out, aa=aa_result)
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command("chat")
def chat(
    scenario: str = typer.Argument(..., help="Scenario TOML; its world table sets the world."),
    users: int = typer.Option(8, "--users", min=1, help="Conversations to simulate."),
    show: int = typer.Option(3, "--show", min=0, help="Transcripts to print."),
    seed: int = typer.Option(0, "--seed", help="Seeds users, signals and sampling."),
    bot_model: str = typer.Option(
        "smollm2", "--bot-model", help="Character policy: HF folder/id or smollm2 (packaged)."
    ),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="Bot reply cap."),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0, help="Bot temperature."),
) -> None:
    """Run N conversations of the character policy against LLM-simulated users; print
    transcripts with their signals, steerability and engagement."""
    from flywheel.chat import print_run, run_chat
    from policies import PolicySpec, SamplingParams

    try:
        run = run_chat(
            scenario, users, seed=seed, bot=PolicySpec(model=bot_model),
            bot_params=SamplingParams(max_new_tokens, temperature, 0.95, seed),
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err
    print_run(run, show, echo=typer.echo)


if __name__ == "__main__":
    app()
