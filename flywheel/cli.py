"""The ``flywheel`` command line.

Each command imports its heavy modules inside the function body so that ``flywheel --help``
answers in well under a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

app = typer.Typer(
    help="Rehearse a character-chat LLM improvement flywheel in simulation.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
# Errors a user can fix (a missing file, a bad table, flag or scenario; pydantic's
# ValidationError and flywheel.scenario.ScenarioError are ValueErrors): one line, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (FileNotFoundError, ValueError)
USER_ERROR_EXIT = 2


@contextmanager
def user_errors(*kinds: type[Exception]) -> Iterator[None]:
    """Turn ``kinds`` (default ``USER_ERRORS``) into ``error: <message>`` on stderr and exit
    code ``USER_ERROR_EXIT``; any other exception is a bug and keeps its traceback."""
    expected = kinds or USER_ERRORS
    try:
        yield
    except expected as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=USER_ERROR_EXIT) from err


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
    sequential: bool = typer.Option(
        False, "--sequential", help="Also print day-by-day always-valid CIs and early stops."
    ),
) -> None:
    """Analyse an A/B test from a user-level table: lifts, CUPED, SRM, guardrails, decision.

    A twin table (a 'life' column; flywheel.ab.paired) gets the paired analysis beside the
    standard one, which sees only each user's hash-assigned arm."""
    from pathlib import Path

    from flywheel.ab import (
        AnalysisConfig,
        aa_test,
        analyze_paired,
        is_twin_table,
        sequential_monitor,
        standard_view,
    )
    from flywheel.ab import analyze as run_analysis
    from flywheel.ab_report import write_report
    from flywheel.metrics import aggregate_users, load_table

    with user_errors():
        config = AnalysisConfig(
            alpha=alpha,
            treatment_share=treatment_share,
            correction=correction,
            retention_day=retention_day,
            cuped=cuped,
        )
        loaded = load_table(table)
        paired = analyze_paired(loaded, config) if is_twin_table(loaded) else None
        frame = standard_view(loaded)
        users = aggregate_users(frame)
        result = paired.standard if paired is not None else run_analysis(users, config)
        monitors = [sequential_monitor(frame, config)] if sequential else []
        if sequential and paired is not None:
            monitors.append(sequential_monitor(loaded, config))
    typer.echo(result.summary())
    Path(out).mkdir(parents=True, exist_ok=True)
    if paired is not None:
        typer.echo(paired.summary())
        (Path(out) / "paired.json").write_text(paired.to_json())
    for monitor in monitors:
        typer.echo(monitor.summary())
        (Path(out) / f"sequential_{monitor.design}.json").write_text(monitor.to_json())
    aa_result = aa_test(users, aa, seed=seed, config=config, progress=True) if aa else None
    if aa_result is not None:
        typer.echo(aa_result.summary())
    paths = write_report(result, frame, out, aa=aa_result)
    typer.echo(f"wrote {', '.join(str(p) for p in paths.values())}")


rm_app = typer.Typer(help="Reward models trained on a run's logs.", no_args_is_help=True)
app.add_typer(rm_app, name="rm")


@rm_app.command("train")
def rm_train(
    run_dir: str = typer.Argument(..., help="Run directory (run.duckdb + artifacts/)."),
    kind: str = typer.Option(
        "pointwise", "--kind", help="pointwise | pairwise | signals (see rewards.rm.base)."
    ),
    backbone: str = typer.Option(
        "minilm", "--backbone", help="minilm (frozen embeddings + head) | llm (RewardTrainer)."
    ),
    style_controlled: bool = typer.Option(
        False, "--style-controlled", help="Fit style as a separate term, dropped at scoring."
    ),
    target: str | None = typer.Option(
        None,
        "--target",
        help="pointwise only: engaged (default) | continued | liked | returned_next_day.",
    ),
    out: str | None = typer.Option(
        None, "--out", help="Model folder (default RUN_DIR/artifacts/rm/<model name>)."
    ),
    experiment: str | None = typer.Option(
        None, "--experiment", help="Train on one experiment's logs (default: all)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the user split and training."),
    test_size: float = typer.Option(0.2, "--test-size", help="Share of users held out."),
    llm_model: str = typer.Option(
        "smollm2", "--llm-model", help="LLM backbone: HF folder, or smollm2 (packaged)."
    ),
    max_pairs: int | None = typer.Option(
        None, "--max-pairs", help="LLM backbone: most training pairs per target."
    ),
    epochs: float = typer.Option(1.0, "--epochs", help="LLM backbone: passes over the pairs."),
    eval_rows: int | None = typer.Option(
        None, "--eval-rows", help="Score at most this many held-out turns and pairs."
    ),
) -> None:
    """Train a reward model on RUN_DIR's logs; write it and rm_eval.json (held-out accuracy,
    gold correlation, style correlations)."""
    from flywheel.rm_eval import EVAL_FILE, summarize
    from flywheel.rm_eval import rm_train as run_rm_train
    from rewards.rm import LLMConfig

    with user_errors():
        llm_config = LLMConfig(model=llm_model, max_pairs=max_pairs, epochs=epochs)
        folder, report = run_rm_train(
            run_dir,
            kind,
            backbone,
            style_controlled=style_controlled,
            target=target,
            out=out,
            experiment_id=experiment,
            seed=seed,
            test_size=test_size,
            llm_config=llm_config,
            max_eval_rows=eval_rows,
        )
    typer.echo(summarize(report))
    typer.echo(f"wrote {folder} and {folder / EVAL_FILE}")


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

    with user_errors():
        params = SamplingParams(
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95, seed=seed
        )
        run = run_chat(
            scenario, users, seed=seed, bot=PolicySpec(model=bot_model), bot_params=params
        )
    print_run(run, show, echo=typer.echo)


@app.command("ab")
def ab(
    scenario: str = typer.Argument(
        ..., help="Scenario TOML: seed and world, traffic, analysis tables."
    ),
    control: str = typer.Option(
        "smollm2", "--control", help="Control POLICY: HF id, local folder or smollm2."
    ),
    treatment: str = typer.Option(
        "smollm2",
        "--treatment",
        help="Treatment POLICY; 'violate:MODEL' or 'violate@RATE:MODEL' plants a "
        "policy that breaks its characters' prohibitions on a RATE share of replies, "
        "'unsafe@RATE:MODEL' one whose replies the safety check blocks, "
        "'stylevar@EMOJI,FILLER:MODEL' one that appends emoji / filler to drawn replies.",
    ),
    out: str = typer.Option(..., "--out", help="Run directory; rerun with it to resume."),
    design: str | None = typer.Option(
        None,
        "--design",
        help="standard (users in their hashed arm) or twins (every user lives the test "
        "days once per arm); default: the scenario's traffic.design.",
    ),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Progress bar over days."),
) -> None:
    """Simulate an A/B test (pre-period + test days of traffic) and analyse it: writes
    RUN_DIR/ab/result.json, report.md and plots. Rerunning resumes an interrupted run."""
    from flywheel.experiment import run_ab

    with user_errors():
        outcome = run_ab(scenario, control, treatment, out, progress=progress, design=design)
    typer.echo(outcome.result.summary())
    sim = outcome.simulation
    typer.echo(
        f"simulated {sim['days']} days, {sim['sessions']} sessions, {sim['bot_replies']} bot "
        f"replies in {sim['simulated_wall_s']:.0f} s ({sim['tokens_per_s']:.1f} tokens/s, mean "
        f"bot batch {sim['mean_bot_batch']:.1f})"
    )
    typer.echo(f"wrote {', '.join(str(p) for p in outcome.paths.values())}")


train_app = typer.Typer(
    help="Train the next character model on a run's logs (SFT, DPO, GRPO).", no_args_is_help=True
)
app.add_typer(train_app, name="train")


def _train(
    recipe: str,
    *,
    run_dir: str,
    from_model: str,
    out: str,
    steps: int,
    rm: str | None,
    experiment: str | None,
    seed: int,
    full: bool,
    config: str | None,
    hold_rates: list[str],
    multiturn: int,
    users: int,
) -> None:
    if hold_rates and recipe != "grpo":
        raise ValueError(f"--hold-rate needs online sampling; fix: use it with grpo, not {recipe}")
    if multiturn and recipe != "grpo":
        raise ValueError(
            f"--multiturn rolls out conversations; fix: use it with grpo, not {recipe}"
        )
    from flywheel.store import read_logged_world
    from rewards.rm.base import load_reward_model
    from training import recipes
    from training.grpo import load_config_overrides

    logged = read_logged_world(run_dir, experiment)
    prompts = {name: c.system_prompt() for name, c in logged.characters.items()}
    checkers = {name: c.checkers for name, c in logged.characters.items()}
    scorer = load_reward_model(rm) if rm else None
    overrides = load_config_overrides(config) if config else None
    common = {
        "model": from_model,
        "out": out,
        "steps": steps,
        "seed": seed,
        "use_peft": not full,
        "overrides": overrides,
    }
    if recipe == "sft":
        folder = recipes.run_sft(logged.turns, prompts, **common)
    elif recipe == "dpo":
        folder = recipes.run_dpo(logged.turns, prompts, checkers, scorer=scorer, **common)
    elif multiturn:
        from flywheel.multiturn import run_grpo_multiturn
        from sim.world import World
        from training.multiturn import MultiTurnSettings

        common["world"] = World.build(logged.world, seed=seed)
        settings = MultiTurnSettings(max_bot_turns=multiturn)
        folder = run_grpo_multiturn(
            logged.turns,
            **common,
            users=users,
            settings=settings,
            scorer=scorer,
            hold_rates=hold_rates,
        )
    else:
        folder = recipes.run_grpo(
            logged.turns, prompts, checkers, scorer=scorer, hold_rates=hold_rates, **common
        )
    typer.echo(f"wrote {folder} (serve it with --treatment {folder})")


def _train_command(recipe: str, summary: str) -> None:
    @train_app.command(recipe, help=summary)
    def command(
        run_dir: str = typer.Argument(..., help="Run directory (run.duckdb + artifacts/)."),
        from_model: str = typer.Option(
            "smollm2", "--from", help="Starting model: HF folder/id or smollm2 (packaged)."
        ),
        out: str = typer.Option(..., "--out", help="Folder of the merged checkpoint."),
        steps: int = typer.Option(20, "--steps", min=1, help="Optimizer steps."),
        rm: str | None = typer.Option(
            None, "--rm", help="DPO/GRPO: reward model folder (flywheel rm train) to add."
        ),
        experiment: str | None = typer.Option(
            None, "--experiment", help="Train on one experiment's logs (default: all)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seeds the user split, sampling, training."),
        full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of LoRA."),
        config: str | None = typer.Option(
            None,
            "--config",
            help="YAML of TRL config fields (GPU: training/configs/grpo_vllm.yaml).",
        ),
        hold_rate: str = typer.Option(
            "",
            "--hold-rate",
            help="GRPO: features whose rate is held at the logged replies' rate, comma "
            "separated (emoji, exclamations).",
        ),
        multiturn: int = typer.Option(
            0,
            "--multiturn",
            min=0,
            help="GRPO: roll out whole conversations of up to N bot replies with new "
            "simulated users of the run's world (0: single replies to logged contexts).",
        ),
        users: int = typer.Option(
            64, "--users", min=1, help="GRPO --multiturn: simulated users to train with."
        ),
    ) -> None:
        with user_errors():
            _train(
                recipe,
                run_dir=run_dir,
                from_model=from_model,
                out=out,
                steps=steps,
                rm=rm,
                experiment=experiment,
                seed=seed,
                full=full,
                config=config,
                hold_rates=[f.strip() for f in hold_rate.split(",") if f.strip()],
                multiturn=multiturn,
                users=users,
            )


_train_command("sft", "Supervised fine-tuning on RUN_DIR's curated replies (train users only).")
_train_command(
    "dpo",
    "DPO on best/worst pairs of the model's own replies to curated contexts, "
    "scored by --rm, the steerability checkers and the artifact penalty.",
)
_train_command(
    "grpo",
    "GRPO on curated contexts with the --rm score, steerability checkers and "
    "the artifact penalty as separate rewards.",
)


@app.command("bon")
def bon(
    run_dir: str = typer.Argument(..., help="Run directory (run.duckdb + artifacts/)."),
    n: str = typer.Option("1,2,4,8,16", "--n", help="Comma-separated n of best-of-n."),
    rm: str = typer.Option(..., "--rm", help="Reward model folder: the proxy being optimised."),
    policy: str = typer.Option(
        "smollm2",
        "--policy",
        help="Sampling policy: HF folder or smollm2, or a planted wrapper such as "
        "stylevar@0.4,0.35:smollm2 (emoji / filler on drawn samples, as the run served).",
    ),
    contexts: int = typer.Option(48, "--contexts", min=1, help="Held-out contexts to sample."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", min=1, help="Reply cap."),
    out: str | None = typer.Option(None, "--out", help="Folder (default RUN_DIR/artifacts/bon)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the user split and the sampling."),
) -> None:
    """Best-of-n sweep on held-out contexts: proxy reward (--rm) and gold utility of the
    proxy-best of n samples vs KL = log n - (n-1)/n; writes sweep.csv, sweep.json, bon.png."""
    import json
    from pathlib import Path

    from flywheel.store import RunStore, read_logged_world
    from policies import PolicySpec, SamplingParams, load_policy
    from rewards.rm.base import load_reward_model
    from sim.planted import planted_policy
    from sim.replay import MOMENT_COLUMNS, GoldReplay
    from training.recipes import curated
    from training.rejection import run_best_of_n_sweep

    with user_errors():
        ns = sorted({int(x) for x in n.split(",") if x.strip()})
        if not ns or ns[0] < 1:
            raise ValueError(f"--n must list positive integers, got {n!r}; e.g. --n 1,2,4,8,16")
        logged = read_logged_world(run_dir)
        prompts = {k: c.system_prompt() for k, c in logged.characters.items()}
        data = curated(logged.turns, prompts, seed)
        held = data.held_out if not data.held_out.empty else data.train
        held = held.drop_duplicates("session_id").head(contexts)
        proxy = load_reward_model(rm)
        with RunStore(run_dir, read_only=True) as store:
            users = store.read_users()
        sweep, candidates = run_best_of_n_sweep(
            planted_policy(policy, lambda m: load_policy(PolicySpec(model=m, dtype="auto"))),
            list(held["prompt"]),
            list(held["character"]),
            ns,
            proxy=lambda c, r: proxy.score(c, r),
            gold=GoldReplay(users, logged.turns, logged.characters, logged.world.gold),
            params=SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed),
            extra=held[list(MOMENT_COLUMNS)],
        )
    folder = Path(out) if out else Path(run_dir) / "artifacts" / "bon"
    folder.mkdir(parents=True, exist_ok=True)
    sweep.table.to_csv(folder / "sweep.csv", index=False)
    candidates.drop(columns=["prompt"]).to_parquet(folder / "candidates.parquet")
    (folder / "sweep.json").write_text(
        json.dumps(
            {
                "rm": rm,
                "policy": policy,
                "proxy_sd": sweep.proxy_sd,
                "gold_sd": sweep.gold_sd,
                "n_contexts": sweep.n_contexts,
                "table": sweep.table.to_dict(orient="records"),
            },
            indent=2,
        )
    )
    png = sweep.plot(folder / "bon.png", title=f"Best-of-n under {Path(rm).name}")
    typer.echo(sweep.summary())
    typer.echo(f"wrote {folder / 'sweep.csv'}, {folder / 'sweep.json'}, {png}")


@app.command("run")
def run(
    scenario: str = typer.Argument(..., help="Scenario TOML file, e.g. scenarios/quickstart.toml."),
    out: str = typer.Option(..., "--out", help="Run directory (an existing one is resumed)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars or step lines."),
) -> None:
    """Run (or resume) the flywheel: generation after generation, gates, A/B, ship/hold."""
    import os
    import time

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    from flywheel.loop import run_scenario
    from flywheel.report import text_table
    from flywheel.scenario import ScenarioError

    started = time.perf_counter()
    with user_errors(FileNotFoundError, ScenarioError):
        records = run_scenario(scenario, out, progress=not quiet)
    typer.echo(text_table(records))
    typer.echo(
        f"wrote {Path(out) / 'generations.json'}, {Path(out) / 'generations.md'} and "
        f"{Path(out) / 'plots'}; this invocation took {time.perf_counter() - started:.0f} s"
    )


@app.command("plan")
def plan(
    scenario: str = typer.Argument(..., help="Scenario TOML (flywheel run or flywheel ab)."),
    mde: float = typer.Option(0.05, "--mde", help="Target relative lift (0.1 = +10%)."),
    power: float | None = typer.Option(None, "--power", help="Default: the scenario's (0.8)."),
    pilot: str | None = typer.Option(
        None, "--pilot", help="RUN_DIR of a logged experiment to plan from (else: run one)."
    ),
    experiment: str = typer.Option("ab", "--experiment", help="Experiment id in --pilot."),
    control: str | None = typer.Option(
        None, "--control", help="Pilot control POLICY; default: the scenario's [policy] model."
    ),
    treatment: str | None = typer.Option(
        None,
        "--treatment",
        help="Pilot treatment POLICY, ideally the candidate itself (twin variance grows with "
        "the effect); default: the control (an A/A pilot, which understates it).",
    ),
    users: int | None = typer.Option(None, "--pilot-users", help="Resize the pilot's users."),
    out: str | None = typer.Option(None, "--out", help="Pilot run dir; default runs/plan/NAME."),
    progress: bool = typer.Option(True, "--progress/--quiet", help="Progress bars."),
) -> None:
    """Users x days the standard design (with CUPED) and the twin design need to detect
    --mde, priced in generated tokens and CPU minutes on this machine, from a twin pilot."""
    from pathlib import Path

    from flywheel.ab.planner import format_plan
    from flywheel.pilot import pilot_scenario, read_pilot, run_pilot, scenario_verdict
    from flywheel.pilot import plan as make_plan

    with user_errors():
        ab_scenario, default_control = pilot_scenario(scenario)
        if pilot is None:
            control = control or default_control
            run_dir = Path(out or Path("runs") / "plan" / ab_scenario.name)
            run_pilot(
                ab_scenario, control, treatment or control, run_dir, users=users, progress=progress
            )
        else:
            run_dir = Path(pilot)
        measured = read_pilot(run_dir, experiment)
        plans = make_plan(measured, ab_scenario, mde, power)
        verdict = scenario_verdict(measured, ab_scenario, mde)
    typer.echo(f"pilot: {measured.source}")
    typer.echo(
        f"cost on this machine: {measured.tokens_per_user_day:.0f} generated tokens per "
        f"user-day, {measured.seconds_per_token * 1000:.1f} ms per token"
    )
    typer.echo(format_plan(plans))
    for line in verdict:
        typer.echo(line)
    if treatment is None and pilot is None:
        typer.echo(
            "note: an A/A pilot understates the twin design's variance under a real effect; "
            "rerun with --treatment CANDIDATE for the twin plan of that candidate"
        )


@app.command("report")
def report(
    run_dir: str = typer.Argument(..., help="Run directory of `flywheel run`."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the Markdown report instead."),
) -> None:
    """Print a run's per-generation table again (from RUN_DIR/generations.json)."""
    from flywheel.report import markdown as render_markdown
    from flywheel.report import read_document, text_table

    with user_errors(FileNotFoundError):
        document = read_document(run_dir)
    records = document["generations"]
    typer.echo(render_markdown(document["scenario"], records) if markdown else text_table(records))


@app.command("fidelity")
def fidelity(
    run_dir: str = typer.Argument(..., help="Run directory with simulated traffic (run.duckdb)."),
    experiment: str | None = typer.Option(
        None, "--experiment", help="Read one experiment (default: every experiment, pooled)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the human resamples (distinct-2)."),
) -> None:
    """Compare a run's simulated users with held-out human chat: a PASS / MISS line per target.

    Writes RUN_DIR/fidelity.json, fidelity.md and fidelity_qq.png (flywheel.fidelity)."""
    from flywheel.fidelity import fidelity_card, write_fidelity

    with user_errors():
        card = fidelity_card(run_dir, experiment_id=experiment, seed=seed)
    paths = write_fidelity(card, run_dir)
    typer.echo(card.summary())
    typer.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@app.command("dashboard")
def dashboard(
    run_dir: str = typer.Argument(..., help="Run directory (run.duckdb, generations.json)."),
    port: int = typer.Option(8501, "--port", min=1, max=65535, help="Port on 127.0.0.1."),
) -> None:
    """Serve the Streamlit dashboards over RUN_DIR on 127.0.0.1 (read-only, headless)."""
    import subprocess
    import sys
    from pathlib import Path

    from dashboards import APP_PATH

    if not (Path(run_dir) / "run.duckdb").is_file():
        # Not an error: the dashboard can be opened before the run starts and says so.
        typer.echo(f"note: {run_dir} holds no run.duckdb yet; the dashboard will say so")
    typer.echo(f"CharacterFlywheel dashboard for {run_dir}: http://127.0.0.1:{port}")
    options = {
        "--server.address": "127.0.0.1",
        "--server.port": str(port),
        "--server.headless": "true",
        "--browser.gatherUsageStats": "false",
    }
    command = [sys.executable, "-m", "streamlit", "run", str(APP_PATH)]
    command += [part for option in options.items() for part in option]
    command += ["--", "--run-dir", str(Path(run_dir).resolve())]
    raise typer.Exit(code=subprocess.call(command))


if __name__ == "__main__":
    app()
