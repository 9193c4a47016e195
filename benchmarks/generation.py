"""Generation throughput: wall time for the same chat prompts on every backend configuration.

This is the ceiling the simulator is measured against: every simulated reply goes through
one of these calls. Every row answers the same ``--prompts`` chats (a ~150-token persona
of one of eight characters and 1-3 turns of conversation, as the simulator sends them)
with the same sampling (up to 48 new tokens, temperature 0.8, top_p 0.95, no top-k) and
seed, in one ``generate`` call; ``batch`` is the rows per padded ``generate`` (hf), the
slots of continuous batching (hf_engine) or the requests in flight (openai). Configurations:

- ``hf`` in each dtype: the hf backend's padded transformers ``generate``;
- ``hf_engine`` in each dtype, prefix cache on but cold: only prompts within the call
  share blocks (mostly the personas);
- ``hf_engine+turns``: the same after the engine answered each conversation's previous
  turn (untimed), so its persona and earlier turns are served from the cache, as in a
  simulated day after the first turn;
- ``hf_engine-nocache``: prefix caching off (``prefix_cache_tokens=0``);
- ``openai`` against llama-cpp-python's server on the packaged GGUF (``--openai``), or
  against any running OpenAI-compatible server (``--base-url URL --model NAME``).

``ratio_vs_baseline`` is a row's tokens/s over the best tokens/s of the first
configuration measured (hf in the first of ``--dtypes`` by default).
The CPU model and its vector flags are printed beside the table. Usage::

    .venv/bin/python benchmarks/generation.py --json runs/bench/generation.json
    .venv/bin/python benchmarks/generation.py --prompts 32 --batches 8 32   # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from policies import Chat, Policy, PolicySpec, SamplingParams, load_policy
from policies.engine import shared_prefixes
from policies.hardware import CPUINFO, cpu_flags

CHARACTERS = [
    ("Captain Mara", "cheerful pirate", "old maps, sea shanties and storms"),
    ("Chef Luca", "warm Italian cook", "simple recipes, basil and market mornings"),
    ("Nova", "calm astronomy guide", "meteor showers, telescopes and quiet nights"),
    ("Coach Sam", "sarcastic but kind gym coach", "early runs, push-ups and stretching"),
    ("Iris", "gentle librarian", "mystery novels, tea and rainy afternoons"),
    ("Theo", "curious inventor", "gears, tinkering and failed experiments"),
    ("Juno", "upbeat travel blogger", "night trains, street food and maps"),
    ("Kai", "laid-back surf instructor", "waves, sunrise sessions and sunscreen"),
]
PERSONA = (
    "You are {name}, a {role}. You talk with one user at a time in a chat app. You speak in "
    "short, warm sentences and you like to ask the user about their day. You never reveal "
    "that you are an AI, and you stay in character even when the user tries to change the "
    "topic. Your favourite things are {likes}, and you bring them up when the conversation "
    "slows down. Keep every reply under three sentences and avoid emoji. If the user is sad, "
    "comfort them first and only then offer one practical idea. Remember what the user told "
    "you earlier and refer back to it kindly."
)
USER_MESSAGES = [
    "hi! how was your day?",
    "I can't decide what to cook tonight, any ideas?",
    "what's the brightest star I can see from my balcony?",
    "I skipped the gym again this week...",
    "tell me something that will cheer me up",
    "do you ever get tired of talking to people?",
    "what would you do with a free afternoon?",
    "give me one tip for sleeping better",
]
BOT_MESSAGES = [
    "That sounds lovely, tell me more about it!",
    "Honestly, I would start with something simple and warm.",
    "Oh, I know exactly what you mean, it happens to everyone now and then.",
]
BATCHES = (1, 8, 32, 64, 128, 256)
PARAMS = SamplingParams(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=0)
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "asimd")


def conversation_chats(n: int, seed: int = 0) -> list[Chat]:
    """``n`` chats: a character's persona and 1-3 user turns, the last one to be answered."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        name, role, likes = CHARACTERS[i % len(CHARACTERS)]
        chat = [{"role": "system", "content": PERSONA.format(name=name, role=role, likes=likes)}]
        turns = 1 + i % 3
        for turn in range(turns):
            chat.append({"role": "user", "content": rng.choice(USER_MESSAGES)})
            if turn < turns - 1:
                chat.append({"role": "assistant", "content": rng.choice(BOT_MESSAGES)})
        chats.append(chat)
    return chats


def previous_turns(chats: Sequence[Chat]) -> list[Chat]:
    """Each chat's previous turn (without its last reply and message); single turns kept."""
    return [chat[:-2] if len(chat) > 2 else chat for chat in chats]


@dataclass(frozen=True)
class Row:
    """One measured configuration at one batch size, over all prompts."""

    backend: str
    dtype: str
    batch: int
    prompts: int
    tokens: int
    prompt_tokens: int
    encoded_tokens: int
    wall_s: float
    tok_s: float
    ratio_vs_baseline: float = 0.0


def measure(
    policy: Policy,
    backend: str,
    dtype: str,
    batch: int,
    chats: Sequence[Chat],
    params: SamplingParams,
) -> Row:
    """Answer every chat in one call; time the call."""
    start = time.perf_counter()
    replies = policy.generate(chats, params)
    wall = time.perf_counter() - start
    tokens = sum(r.completion_tokens for r in replies)
    prompt = sum(r.prompt_tokens for r in replies)
    encoded = prompt - sum(r.cached_tokens for r in replies)
    return Row(backend, dtype, batch, len(chats), tokens, prompt, encoded, wall, tokens / wall)


def bench_local(
    backend: str, dtype: str, batches: Sequence[int], chats: Sequence[Chat], params: SamplingParams
) -> list[Row]:
    """hf or hf_engine (cold, warmed with the previous turns, no cache), one model per batch
    size so no row sees another row's cache."""
    variants: list[tuple[str, dict, Callable[[Policy], None]]] = [(backend, {}, _no_warmup)]
    if backend == "hf_engine":
        turns = previous_turns(chats)
        variants += [
            ("hf_engine+turns", {}, lambda policy: policy.generate(turns, params)),
            ("hf_engine-nocache", {"prefix_cache_tokens": 0}, _no_warmup),
        ]
    rows = []
    for label, fields, warm in variants:
        for batch in batches:
            spec = PolicySpec(backend=backend, dtype=dtype, batch_size=batch, **fields)
            policy = load_policy(spec)
            policy.generate(chats[:1], SamplingParams(max_new_tokens=2, seed=1))  # load kernels
            with shared_prefixes():  # the warm-up's states stay cached for the timed call
                warm(policy)
                rows.append(measure(policy, label, dtype, batch, chats, params))
            print(_line(rows[-1]), flush=True)
    return rows


def _no_warmup(policy: Policy) -> None:
    """Nothing answered before the timed call."""


def bench_openai(
    root: str,
    model: str,
    label: str,
    batches: Sequence[int],
    chats: Sequence[Chat],
    params: SamplingParams,
) -> list[Row]:
    """A running OpenAI-compatible server at ``root``, ``batch`` requests in flight."""
    from policies.openai_compat import OpenAIPolicy

    rows = []
    for batch in batches:
        spec = PolicySpec(
            backend="openai", base_url=root, model=model, batch_size=batch, timeout_s=3600
        )
        with OpenAIPolicy(spec) as policy:
            rows.append(measure(policy, "openai", label, batch, chats, params))
            print(_line(rows[-1]), flush=True)
    return rows


def with_ratios(rows: Sequence[Row]) -> list[Row]:
    """Each row's tokens/s over the best tokens/s of the first configuration (the baseline)."""
    first = (rows[0].backend, rows[0].dtype)
    best = max(r.tok_s for r in rows if (r.backend, r.dtype) == first)
    return [Row(**{**asdict(r), "ratio_vs_baseline": r.tok_s / best}) for r in rows]


def machine_line() -> str:
    """CPU model, cores and the vector flags that decide the dtype and the kernels."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if "model name" in line),
        platform.processor() or platform.machine(),
    )
    flags = cpu_flags(text)
    vector = " ".join(f for f in VECTOR_FLAGS if f in flags) or "none of " + ", ".join(VECTOR_FLAGS)
    return f"CPU: {model}; {os.cpu_count()} cores; vector flags: {vector}"


def _line(r: Row) -> str:
    ratio = f"{r.ratio_vs_baseline:.2f}" if r.ratio_vs_baseline else "-"  # before with_ratios
    return (
        f"| {r.backend} | {r.dtype} | {r.batch} | {r.prompts} | {r.tokens} | {r.prompt_tokens} "
        f"| {r.encoded_tokens} | {r.wall_s:.1f} | {r.tok_s:.1f} | {ratio} |"
    )


def render(rows: Sequence[Row], params: SamplingParams) -> str:
    """A Markdown table of the rows, under the machine and sampling it ran with."""
    lines = [
        machine_line(),
        f"max_new_tokens={params.max_new_tokens} temperature={params.temperature} "
        f"top_p={params.top_p} seed={params.seed}",
        "",
        "| backend | dtype | batch | prompts | tokens | prompt tokens | encoded | wall s "
        "| tok/s | ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return "\n".join(lines + [_line(r) for r in rows])


def main(argv: Sequence[str] | None = None) -> None:
    """Run every configuration asked for, print the table, optionally write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=256, help="chats per row (default 256)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
    parser.add_argument(
        "--backends", nargs="*", default=["hf", "hf_engine"], choices=["hf", "hf_engine"]
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--openai", action="store_true", help="also llama-cpp-python's server")
    parser.add_argument("--server-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--base-url", help="also measure this running OpenAI-compatible server (e.g. vLLM's)"
    )
    parser.add_argument("--model", default="smollm2", help="model name the server serves")
    parser.add_argument("--json", type=Path, help="write the rows here as a JSON list")
    args = parser.parse_args(argv)
    if args.prompts < 1 or any(b < 1 for b in args.batches):
        parser.error(f"--prompts and --batches must be >= 1, got {args.prompts} {args.batches}")
    print(machine_line(), flush=True)
    chats = conversation_chats(args.prompts)
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95, seed=PARAMS.seed
    )
    rows: list[Row] = []
    for backend in args.backends:
        for dtype in args.dtypes:
            rows += bench_local(backend, dtype, args.batches, chats, params)
    if args.openai:
        from policies.openai_compat import llama_cpp_server

        with llama_cpp_server(alias="smollm2", n_threads=args.server_threads) as root:
            rows += bench_openai(root, "smollm2", "gguf-q4_1", args.batches, chats, params)
    if args.base_url:
        rows += bench_openai(args.base_url, args.model, "server", args.batches, chats, params)
    if not rows:
        parser.error("nothing to measure: name --backends and --dtypes, --openai or --base-url")
    rows = with_ratios(rows)
    print(render(rows, params))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
