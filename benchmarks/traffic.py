"""Simulator throughput: where a simulated day's time goes, against the backend's own speed.

Simulated days of a population (bot replies and simulated-user messages both from the chosen
model, features, checkers and gold scoring, the run store's transactions) are run through
the traffic model as ``flywheel ab`` runs them, with every backend call recorded, then:

1. **simulator**: end to end, generated tokens (bot + user) per second of the whole run,
   and how the time splits into generation (bot and user calls), scoring (features,
   embeddings, checkers, gold: the rest of ``bot_turn``) and the simulator itself
   (SimPy, openers, rows, the store);
2. **replay**: the exact recorded calls (same chats, same batches, same seeds) through the
   bare policy: the backend's throughput at the batch sizes the simulator produced;
3. **raw, best batch**: the recorded bot chats re-batched at each of ``--raw-batches``; the
   best is the backend's ceiling on these prompts. ``simulator / raw best`` is the figure
   the simulator is judged by (target >= 0.8);
4. **one at a time** (``--baseline-users N``, 0 skips it): the same traffic model with
   ``batching=False``, each conversation its own calls.

It also reports the prompt tokens the backend encoded per generated token: prompt tokens
minus those served from its prefix cache (``Generation.cached_tokens``), over generated
tokens. Usage::

    .venv/bin/python benchmarks/traffic.py                          # SmolLM2, 120 users
    .venv/bin/python benchmarks/traffic.py --users 300 --days 2 --json runs/bench/traffic.json
    .venv/bin/python benchmarks/traffic.py --model tiny --users 400  # random 2-layer Llama

The latest figures, the machine they came from and how to read them are in
benchmarks/README.md. The tiny random Llama is no stand-in for a real model here: its cost
is per row (a 49k-token vocabulary projection and top-p sort for every row), not weight
reads, so batching gains it little.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flywheel.store import RunStore
from policies import Chat, Generation, Policy, PolicySpec, SamplingParams, load_policy
from policies.engine import shared_prefixes
from policies.hardware import machine_summary
from sim.traffic import CountingPolicy, SamplingConfig, TrafficConfig, TrafficSimulator
from sim.world import World, WorldConfig


class RecordingPolicy(CountingPolicy):
    """Counts like ``CountingPolicy`` and keeps every call's chats and params for a replay."""

    def __init__(self, base: Policy) -> None:
        super().__init__(base)
        self.recorded: list[tuple[list[Chat], SamplingParams]] = []

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """Record the call, then generate and count."""
        self.recorded.append((list(chats), params))
        return super().generate(chats, params)


@dataclass(frozen=True)
class Row:
    """One measured configuration: generated tokens over wall seconds."""

    mode: str
    calls: int
    chats: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def mean_batch(self) -> float:
        return self.chats / self.calls if self.calls else float("nan")


@dataclass(frozen=True)
class DayRun:
    """A simulated run with its recorded calls and where its time went."""

    row: Row
    bot: RecordingPolicy
    user: RecordingPolicy
    scoring_s: float
    sessions: int

    @property
    def split(self) -> dict[str, float]:
        """Seconds of generation, scoring and the simulator itself."""
        generation = self.bot.seconds + self.user.seconds
        return {
            "generation_s": generation,
            "scoring_s": self.scoring_s,
            "simulator_s": self.row.seconds - generation - self.scoring_s,
        }

    @property
    def encoded_per_generated(self) -> float:
        """Prompt tokens the backend encoded (not served from cache) per generated token."""
        prompt = sum(p.prompt_tokens - p.cached_tokens for p in (self.bot, self.user))
        return self._per_generated(prompt)

    @property
    def prompt_per_generated(self) -> float:
        """Prompt tokens sent per generated token: what a backend without a cache encodes."""
        return self._per_generated(self.bot.prompt_tokens + self.user.prompt_tokens)

    def _per_generated(self, tokens: int) -> float:
        generated = self.bot.completion_tokens + self.user.completion_tokens
        return tokens / generated if generated else float("nan")


def tiny_llama(path: Path) -> Path:
    """A random 2-layer Llama with SmolLM2's tokenizer (the test suite's tiny model)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from policies.models import smollm2_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def simulate(
    world: World,
    users: list,
    policy: Policy,
    config: TrafficConfig,
    *,
    batching: bool,
    run_dir: Path,
) -> DayRun:
    """Simulate ``config``'s days into a fresh run store, recording every backend call."""
    bot = RecordingPolicy(policy)
    user = RecordingPolicy(world.user_simulator.policy)
    world.user_simulator.policy = user
    simulator = TrafficSimulator(
        world.engine, copy.deepcopy(users), {"control": bot, "treatment": bot}, config,
        seed=0, user_params=world.user_params, user_counter=user, batching=batching,
        progress=True,
    )  # fmt: skip
    try:
        with RunStore(run_dir) as store:
            sink = store.open_sink("bench", {"batching": batching, "users": len(users)})
            started = time.perf_counter()
            simulator.run(sink)
            seconds = time.perf_counter() - started
            days = store.read_days("bench")
    finally:
        world.user_simulator.policy = user.base
    bot_turn_s = float(days.bot_seconds.sum())
    mode = "simulator, whole-day batches" if batching else "simulator, one at a time"
    row = Row(
        mode,
        bot.calls + user.calls,
        bot.chats + user.chats,
        bot.completion_tokens + user.completion_tokens,
        seconds,
    )
    return DayRun(row, bot, user, bot_turn_s - bot.seconds, int(days.sessions.sum()))


def replay(policy: Policy, run: DayRun) -> Row:
    """Replay the recorded calls through the bare policy: generation at the same batches,
    prefixes kept across the calls as the simulator keeps them within a day."""
    tokens, seconds, chats, calls = 0, 0.0, 0, 0
    with shared_prefixes():
        for recorded in (run.bot.recorded, run.user.recorded):
            for batch, params in recorded:
                started = time.perf_counter()
                out = policy.generate(batch, params)
                seconds += time.perf_counter() - started
                tokens += sum(g.completion_tokens for g in out)
                chats, calls = chats + len(batch), calls + 1
    return Row("replay of its calls (generation only)", calls, chats, tokens, seconds)


def raw(policy: Policy, chats: list[Chat], batch: int, params: SamplingParams) -> Row:
    """``chats`` in consecutive calls of ``batch``: the backend alone on these prompts."""
    tokens, seconds, calls = 0, 0.0, 0
    for start in range(0, len(chats), batch):
        started = time.perf_counter()
        out = policy.generate(chats[start : start + batch], params)
        seconds += time.perf_counter() - started
        tokens += sum(g.completion_tokens for g in out)
        calls += 1
    return Row(f"raw, batch {batch}", calls, len(chats), tokens, seconds)


def render(rows: Sequence[Row], run: DayRun, model: str, figures: dict[str, float]) -> str:
    """A Markdown table, the time split and the ratios that matter."""
    split = run.split
    lines = [
        f"model {model}; {machine_summary()}",
        f"{run.sessions} sessions; generated tokens are bot + user replies",
        "",
        "| mode | calls | mean batch | tokens | seconds | tok/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.mode} | {r.calls} | {r.mean_batch:.1f} | {r.tokens} | {r.seconds:.1f} "
        f"| {r.tokens_per_s:.1f} |"
        for r in rows
    ]
    total = run.row.seconds
    lines += [
        "",
        "time of the simulated run: "
        + ", ".join(
            f"{k.removesuffix('_s')} {v:.1f} s ({v / total:.0%})" for k, v in split.items()
        ),
        f"prompt tokens encoded per generated token: {run.encoded_per_generated:.2f} "
        f"(sent: {run.prompt_per_generated:.2f}, all encoded without a prefix cache)",
        f"simulator / replay of its own calls: {figures['simulator_over_replay']:.2f}",
        f"simulator / raw at its best batch ({int(figures['best_raw_batch'])}): "
        f"{figures['simulator_over_raw_best']:.2f} (target >= 0.8)",
    ]
    if "batched_over_one_at_a_time" in figures:
        lines.append(
            f"whole-day batches / one at a time: {figures['batched_over_one_at_a_time']:.1f}x tok/s"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark, print its table, and write ``--json`` if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'tiny' (random 2-layer Llama), "
                        "'smollm2' or any HF folder / id")  # fmt: skip
    parser.add_argument("--backend", default="hf_engine", help="policy backend of the model")
    parser.add_argument("--users", type=int, default=120, help="population of the run")
    parser.add_argument("--days", type=int, default=1, help="simulated days")
    parser.add_argument("--baseline-users", type=int, default=0,
                        help="population of a one-at-a-time run (0: skip it)")  # fmt: skip
    parser.add_argument("--turn-cap", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="bot and user replies")
    parser.add_argument("--raw-batches", default="32,64,128", help="batch sizes of the raw rows")
    parser.add_argument("--raw-chats", type=int, default=256, help="recorded chats re-batched")
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        model = str(tiny_llama(tmp_dir / "tiny")) if args.model == "tiny" else args.model
        dtype = "float32" if args.model == "tiny" else "auto"  # bf16 only with native BF16
        spec = PolicySpec(backend=args.backend, model=model, dtype=dtype)
        policy = load_policy(spec)
        world_config = WorldConfig.model_validate(
            {"turn_cap": args.turn_cap,
             "user_llm": {"max_new_tokens": args.max_new_tokens, "policy": spec.model_dump()}}
        )  # fmt: skip
        world = World.build(world_config, seed=0, user_policy=policy)
        population = world.sampler.sample(max(args.users, args.baseline_users))
        params = SamplingConfig(max_new_tokens=args.max_new_tokens)

        def traffic(n: int) -> TrafficConfig:
            return TrafficConfig(
                n_users=n, pre_days=0, test_days=args.days, treatment_share=0.5,
                bot_sampling=params,
            )  # fmt: skip

        # warm-up: the first calls of a process pay one-off costs (allocator, kernels)
        policy.generate([[{"role": "user", "content": "Hello there!"}]] * 2, params.params(0))
        world.engine.embedder.encode(["warm up"])

        run = simulate(world, population[: args.users], policy, traffic(args.users),
                       batching=True, run_dir=tmp_dir / "batched")  # fmt: skip
        rows = [run.row, replay(policy, run)]
        bot_chats = [chat for batch, _ in run.bot.recorded for chat in batch][: args.raw_chats]
        raws = [
            raw(policy, bot_chats, int(b), params.params(1)) for b in args.raw_batches.split(",")
        ]
        rows += raws
        best = max(raws, key=lambda r: r.tokens_per_s)
        figures = {
            "simulator_tok_s": run.row.tokens_per_s,
            "replay_tok_s": rows[1].tokens_per_s,
            "raw_best_tok_s": best.tokens_per_s,
            "best_raw_batch": float(best.mode.rsplit(" ", 1)[1]),
            "simulator_over_replay": run.row.tokens_per_s / rows[1].tokens_per_s,
            "simulator_over_raw_best": run.row.tokens_per_s / best.tokens_per_s,
            "prompt_tokens_encoded_per_generated_token": run.encoded_per_generated,
            "prompt_tokens_sent_per_generated_token": run.prompt_per_generated,
            "mean_bot_batch": run.bot.chats / max(run.bot.calls, 1),
            **run.split,
        }
        if args.baseline_users:
            single = simulate(world, population[: args.baseline_users], policy,
                              traffic(args.baseline_users), batching=False,
                              run_dir=tmp_dir / "single")  # fmt: skip
            rows.append(single.row)
            figures["batched_over_one_at_a_time"] = run.row.tokens_per_s / single.row.tokens_per_s
    print(render(rows, run, args.model, figures))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "model": args.model,
            "backend": args.backend,
            "machine": machine_summary(),
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": [{**asdict(r), "tok_s": r.tokens_per_s} for r in rows],
            "figures": figures,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
