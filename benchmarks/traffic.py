"""Simulator throughput: batched traffic vs one conversation at a time vs the raw backend.

One simulated day of a population (bot replies and simulated-user messages both from the
chosen model, features and gold scoring, the run store's transaction) is timed three ways
in the same process, on the same model:

1. **batched**: the traffic model as it runs in ``flywheel ab``: every reply due at the same
   simulated instant goes into one backend call;
2. **one at a time**: the same traffic model with ``batching=False`` (each conversation its
   own calls), on a smaller population because it is 10-20x slower; rates per
   conversation and per token are comparable across population sizes;
3. **ceilings**: (a) *replay*: the exact backend calls of the batched run (same chats, same
   batches, same seeds) replayed through the bare policy: generation alone, so
   ``batched / replay`` is the share of the simulator's time that is generation (target
   >= 0.8); (b) *raw*: ``benchmarks/generation.py``'s fixed chats at one batch of
   ``--raw-batch``, the backend's batched throughput on short prompts.

Tokens are generated tokens (bot + user). Usage::

    .venv/bin/python benchmarks/traffic.py                          # SmolLM2, 300 users
    .venv/bin/python benchmarks/traffic.py --users 120 --baseline-users 16
    .venv/bin/python benchmarks/traffic.py --model tiny --users 400  # random 2-layer Llama

The latest figures, the machine they came from and how to read them are in
benchmarks/README.md. The tiny random Llama is no stand-in for a real model here: its cost
is per row (a 49k-token vocabulary projection and top-p sort for every row), not weight
reads, so batching gains it little.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flywheel.store import RunStore
from policies import Chat, Generation, Policy, PolicySpec, SamplingParams, load_policy
from sim.traffic import CountingPolicy, SamplingConfig, TrafficConfig, TrafficSimulator
from sim.world import World, WorldConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import CHATS


class RecordingPolicy:
    """Counts like ``CountingPolicy`` and keeps every call's chats and params for a replay."""

    def __init__(self, base: Policy) -> None:
        self.base = base
        self.name = base.name
        self.calls: list[tuple[list[Chat], SamplingParams]] = []

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """Record the call, then generate with the base policy."""
        self.calls.append((list(chats), params))
        return self.base.generate(chats, params)


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    mode: str
    users: int
    conversations: int
    calls: int
    chats: int
    tokens: int
    seconds: float

    @property
    def conversations_per_s(self) -> float:
        return self.conversations / self.seconds if self.conversations else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def mean_batch(self) -> float:
        return self.chats / self.calls


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


def simulate_day(
    world: World,
    users: list,
    policy: Policy,
    config: TrafficConfig,
    *,
    batching: bool,
    run_dir: Path,
) -> tuple[Row, RecordingPolicy, RecordingPolicy]:
    """One simulated day into a fresh run store; returns its row and the recorded calls."""
    bot = RecordingPolicy(policy)
    user_llm = RecordingPolicy(world.user_simulator.policy)
    counter = CountingPolicy(user_llm)
    world.user_simulator.policy = counter
    simulator = TrafficSimulator(
        world.engine, copy.deepcopy(users), {"control": bot, "treatment": bot}, config,
        seed=0, user_params=world.user_params, user_counter=counter, batching=batching,
        progress=False,
    )  # fmt: skip
    with RunStore(run_dir) as store:
        sink = store.open_sink("bench", {"batching": batching, "users": len(users)})
        started = time.perf_counter()
        simulator.run(sink)
        seconds = time.perf_counter() - started
        days = store.read_days("bench")
    world.user_simulator.policy = user_llm.base
    calls = len(bot.calls) + len(user_llm.calls)
    chats = sum(len(c) for c, _ in bot.calls) + sum(len(c) for c, _ in user_llm.calls)
    tokens = int(days.bot_tokens.sum() + days.user_tokens.sum())
    mode = "batched" if batching else "one at a time"
    row = Row(mode, len(users), int(days.sessions.sum()), calls, chats, tokens, seconds)
    return row, bot, user_llm


def replay(policy: Policy, user_policy: Policy, bot: RecordingPolicy, users: RecordingPolicy,
           n_users: int, conversations: int) -> Row:  # fmt: skip
    """Replay the recorded calls through the bare policies: generation time alone."""
    tokens, seconds, chats = 0, 0.0, 0
    for base, recorded in ((policy, bot.calls), (user_policy, users.calls)):
        for batch, params in recorded:
            started = time.perf_counter()
            out = base.generate(batch, params)
            seconds += time.perf_counter() - started
            tokens += sum(g.completion_tokens for g in out)
            chats += len(batch)
    calls = len(bot.calls) + len(users.calls)
    return Row("replay (generation only)", n_users, conversations, calls, chats, tokens, seconds)


def raw(policy: Policy, batch: int, params: SamplingParams) -> Row:
    """``benchmarks/generation.py``'s fixed chats, one call of ``batch``."""
    chats = [CHATS[i % len(CHATS)] for i in range(batch)]
    started = time.perf_counter()
    out = policy.generate(chats, params)
    seconds = time.perf_counter() - started
    tokens = sum(g.completion_tokens for g in out)
    return Row(f"raw generate, batch {batch}", 0, 0, 1, batch, tokens, seconds)


def render(rows: Sequence[Row], model: str) -> str:
    """A Markdown table and the ratios that matter."""
    by_mode = {r.mode: r for r in rows}
    lines = [
        f"model {model}; {os.cpu_count()} CPUs, {platform.machine()}; one simulated day",
        "",
        "| mode | users | conversations | calls | mean batch | tokens | seconds | conv/s | tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.mode} | {r.users} | {r.conversations} | {r.calls} | {r.mean_batch:.1f} | "
        f"{r.tokens} | {r.seconds:.1f} | {r.conversations_per_s:.3f} | {r.tokens_per_s:.1f} |"
        for r in rows
    ]
    batched, single = by_mode["batched"], by_mode["one at a time"]
    replayed = by_mode["replay (generation only)"]
    raw_row = next(r for r in rows if r.mode.startswith("raw"))
    lines += [
        "",
        f"batched / one-at-a-time: {batched.conversations_per_s / single.conversations_per_s:.1f}x "
        f"conversations/s, {batched.tokens_per_s / single.tokens_per_s:.1f}x tokens/s",
        f"batched / replay of its own calls (generation ceiling): "
        f"{batched.tokens_per_s / replayed.tokens_per_s:.2f} (target >= 0.8)",
        f"batched / raw batched generate ({raw_row.mode}): "
        f"{batched.tokens_per_s / raw_row.tokens_per_s:.2f}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'tiny' (random 2-layer Llama), "
                        "'smollm2' or any HF folder / id")  # fmt: skip
    parser.add_argument("--users", type=int, default=300, help="population of the batched run")
    parser.add_argument("--baseline-users", type=int, default=16,
                        help="population of the one-at-a-time run")  # fmt: skip
    parser.add_argument("--turn-cap", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="bot and user replies")
    parser.add_argument("--slot-minutes", type=int, default=360, help="arrival slot width")
    parser.add_argument("--raw-batch", type=int, default=64)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        model = str(tiny_llama(tmp_dir / "tiny")) if args.model == "tiny" else args.model
        dtype = "float32" if args.model == "tiny" else "auto"  # bf16 only with native BF16
        spec = PolicySpec(model=model, dtype=dtype)
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
                n_users=n, pre_days=0, test_days=1, treatment_share=0.5,
                slot_minutes=args.slot_minutes, max_sessions_per_day=1, bot_sampling=params,
            )  # fmt: skip

        # warm-up: the first calls of a process pay one-off costs (allocator, kernels)
        policy.generate(CHATS[:2], params.params(0))
        world.engine.embedder.encode(["warm up"])

        rows: list[Row] = []
        row, bot, users = simulate_day(
            world, population[: args.users], policy, traffic(args.users),
            batching=True, run_dir=tmp_dir / "batched",
        )  # fmt: skip
        rows.append(row)
        rows.append(
            simulate_day(
                world, population[: args.baseline_users], policy,
                traffic(args.baseline_users), batching=False,
                run_dir=tmp_dir / "single",
            )[0]
        )  # fmt: skip
        rows.append(replay(policy, policy, bot, users, args.users, row.conversations))
        rows.append(raw(policy, args.raw_batch, params.params(0)))
    print(render(rows, args.model))


if __name__ == "__main__":
    main()
