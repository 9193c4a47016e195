"""Generation throughput: tokens/s of the policy backends at growing batch sizes.

This is the ceiling the simulator is later measured against: every simulated reply and
every simulated user message goes through one of these calls. Measured:

- ``hf`` on the packaged SmolLM2-135M-Instruct, bf16 and fp32, one ``generate`` call per
  batch (left-padded, so a batch runs until its longest reply ends);
- ``openai`` against llama-cpp-python's server on the packaged GGUF (Q4_1), a batch being
  that many concurrent requests.

Every row answers the same fixed chats (cycled to fill the batch) with the same sampling
parameters and seed; tokens/s counts generated tokens (without the stop token) over wall
time, after one warm-up call per model. Each row generates at least ``--min-chats`` chats,
so the batch-1 row is several calls. Usage::

    .venv/bin/python benchmarks/generation.py            # full run, a few minutes on 2 cores
    .venv/bin/python benchmarks/generation.py --quick    # fewer tokens, ~1 minute
    .venv/bin/python benchmarks/generation.py --dtypes --base-url http://gpu-box:8000/v1 \\
        --model meta-llama/Llama-3.1-8B-Instruct           # only a running vLLM server
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tqdm import tqdm

from policies import Chat, Policy, PolicySpec, SamplingParams, load_policy
from policies.openai_compat import OpenAIPolicy, llama_cpp_server

PERSONAS = [
    "You are Captain Mara, a cheerful pirate. Keep replies short.",
    "You are Chef Luca, a warm Italian cook who loves simple recipes.",
    "You are Nova, a calm astronomy guide. Never use emoji.",
    "You are Sam, a sarcastic but kind gym coach. End with a question.",
]
OPENERS = [
    "hi! how was your day?",
    "I can't decide what to cook tonight, any ideas?",
    "what's the brightest star I can see from my balcony?",
    "I skipped the gym again this week...",
    "tell me something that will cheer me up",
    "do you ever get tired of talking to people?",
    "what would you do with a free afternoon?",
    "give me one tip for sleeping better",
]
# Eight fixed chats: every persona twice, every opener once.
CHATS: list[Chat] = [
    [{"role": "system", "content": PERSONAS[i % len(PERSONAS)]}, {"role": "user", "content": text}]
    for i, text in enumerate(OPENERS)
]
BATCH_SIZES = (1, 8, 32, 64)


@dataclass(frozen=True)
class Row:
    """One measured configuration."""

    backend: str
    dtype: str
    batch: int
    chats: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def measure(
    policy: Policy, backend: str, dtype: str, batch: int, params: SamplingParams, min_chats: int
) -> Row:
    """Generate ``max(batch, min_chats)`` chats in calls of ``batch``; time the calls only."""
    calls = -(-max(batch, min_chats) // batch)
    tokens, seconds = 0, 0.0
    for call in range(calls):
        chats = [CHATS[(call * batch + i) % len(CHATS)] for i in range(batch)]
        start = time.perf_counter()
        replies = policy.generate(chats, params)
        seconds += time.perf_counter() - start
        tokens += sum(reply.completion_tokens for reply in replies)
    return Row(backend, dtype, batch, calls * batch, tokens, seconds)


def bench_hf(
    dtype: str, batch_sizes: Sequence[int], params: SamplingParams, min_chats: int
) -> list[Row]:
    """The hf backend on the packaged SmolLM2, loaded once for all batch sizes."""
    policy = load_policy(PolicySpec(model="smollm2", dtype=dtype, batch_size=max(batch_sizes)))
    policy.generate(CHATS[:1], SamplingParams(max_new_tokens=4))  # warm-up
    return [
        measure(policy, "hf", dtype, batch, params, min_chats)
        for batch in tqdm(batch_sizes, desc=f"hf {dtype}", leave=False)
    ]


def bench_openai(
    root: str,
    model: str,
    label: str,
    batch_sizes: Sequence[int],
    params: SamplingParams,
    min_chats: int,
) -> list[Row]:
    """The openai backend against a running server, ``batch`` requests in flight."""
    rows = []
    for batch in tqdm(batch_sizes, desc="openai", leave=False):
        spec = PolicySpec(
            backend="openai", base_url=root, model=model, batch_size=batch, timeout_s=600
        )
        with OpenAIPolicy(spec) as policy:
            policy.generate(CHATS[:1], SamplingParams(max_new_tokens=4))  # warm-up
            rows.append(measure(policy, "openai", label, batch, params, min_chats))
    return rows


def render(rows: Sequence[Row], params: SamplingParams) -> str:
    """A Markdown table of the rows and each configuration's largest-batch / batch-1 ratio."""
    lines = [
        f"max_new_tokens={params.max_new_tokens} temperature={params.temperature} "
        f"top_p={params.top_p} seed={params.seed}; {os.cpu_count()} CPUs, {platform.machine()}",
        "",
        "| backend | dtype | batch | chats | tokens | seconds | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.backend} | {r.dtype} | {r.batch} | {r.chats} | {r.tokens} | {r.seconds:.1f} "
        f"| {r.tokens_per_s:.1f} |"
        for r in rows
    ]
    lines.append("")
    configs = dict.fromkeys((r.backend, r.dtype) for r in rows)
    for backend, dtype in configs:
        by_batch = {r.batch: r for r in rows if (r.backend, r.dtype) == (backend, dtype)}
        if 1 in by_batch and len(by_batch) > 1:
            top = max(by_batch)
            ratio = by_batch[top].tokens_per_s / by_batch[1].tokens_per_s
            lines.append(f"{backend} {dtype}: batch-{top} / batch-1 throughput = {ratio:.1f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 new tokens, fewer chats")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 48 (16 quick)")
    parser.add_argument("--min-chats", type=int, default=None, help="default 8 (2 quick)")
    parser.add_argument("--dtypes", nargs="*", default=["bfloat16", "float32"])
    parser.add_argument("--no-openai", action="store_true", help="skip the openai backend")
    parser.add_argument(
        "--base-url",
        help="measure this running OpenAI-compatible server (e.g. vLLM's) instead of "
        "starting llama.cpp's on the packaged GGUF",
    )
    parser.add_argument("--model", default="smollm2", help="model name the server serves")
    parser.add_argument("--server-threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    max_new_tokens = args.max_new_tokens or (16 if args.quick else 48)
    min_chats = args.min_chats or (2 if args.quick else 8)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95, seed=0)

    rows: list[Row] = []
    for dtype in args.dtypes:
        rows += bench_hf(dtype, args.batch_sizes, params, min_chats)
    if args.base_url:
        rows += bench_openai(
            args.base_url, args.model, "server", args.batch_sizes, params, min_chats
        )
    elif not args.no_openai:
        with llama_cpp_server(alias=args.model, n_threads=args.server_threads) as root:
            rows += bench_openai(root, args.model, "gguf-q4_1", args.batch_sizes, params, min_chats)
    print(render(rows, params))


if __name__ == "__main__":
    main()
