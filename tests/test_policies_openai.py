"""The openai backend against real servers on 127.0.0.1.

Replies, seeds and concurrency are checked against llama-cpp-python's OpenAI-compatible
server running the packaged SmolLM2 GGUF. Failure modes (bad status, malformed body,
timeouts, retries) are checked against a small real HTTP server written here that answers
what each test scripts, because a healthy llama.cpp server never produces them.
"""

from __future__ import annotations

import contextlib
import json
import runpy
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from policies import Policy, PolicySpec, SamplingParams, load_policy
from policies.openai_compat import (
    REPRODUCIBLE_N_BATCH,
    OpenAIPolicy,
    ServerError,
    llama_cpp_server,
)

CHATS = [
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "What is the weather like on your ship today, captain?"}],
    [
        {"role": "system", "content": "You are a chef."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi there!"},
        {"role": "user", "content": "what should I cook tonight?"},
    ],
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """A llama-cpp-python server on the packaged SmolLM2 GGUF; yields its /v1 root.

    Started ``reproducible``: the seed then fixes each reply whatever the server answered
    before, which the seed tests below rely on (see policies/openai_compat.py).
    """
    # One thread: llama.cpp's threads sync at every layer, so on a busy machine a second
    # thread waits more than it helps.
    with llama_cpp_server(n_threads=1, reproducible=True) as root:
        yield root


@pytest.fixture(scope="module")
def llama_policy(llama_server: str) -> Iterator[OpenAIPolicy]:
    policy = load_policy(PolicySpec(backend="openai", base_url=llama_server, batch_size=4))
    assert isinstance(policy, OpenAIPolicy)
    yield policy
    policy.close()


def test_replies_come_back_with_token_counts(llama_policy: OpenAIPolicy) -> None:
    assert isinstance(llama_policy, Policy)
    out = llama_policy.generate(CHATS, SamplingParams(max_new_tokens=16, seed=1))
    assert len(out) == len(CHATS)
    for g in out:
        assert g.text.strip()
        assert 1 <= g.completion_tokens <= 16
        assert "<|im_end|>" not in g.text
    # The chat template's tokens are counted by the server: the longer chat costs more.
    assert out[2].prompt_tokens > out[0].prompt_tokens > 5


def test_same_seed_same_replies_different_seed_different(llama_policy: OpenAIPolicy) -> None:
    # A reproducible llama.cpp server honours the per-request seed whatever order the
    # requests in flight arrive in: sampling is reproducible over HTTP.
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=7)
    first = llama_policy.generate(CHATS, params)
    assert llama_policy.generate(CHATS, params) == first
    other = llama_policy.generate(CHATS, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8))
    assert [g.text for g in other] != [g.text for g in first]


LONG_CHAT = [
    {"role": "system", "content": "You are a pirate."},
    {"role": "user", "content": "Tell me a long story about the sea and the stars. " * 16},
]


def test_a_reply_does_not_depend_on_what_the_server_answered_before(
    llama_policy: OpenAIPolicy,
) -> None:
    # The server reuses the KV cache of the previous request's common prefix and evaluates
    # only the rest: first the whole long prompt in one batch, then, asked again, only its
    # last token. Batched and single-token kernels round differently (up to ~1 logit here
    # on a 200-token prompt), so a default server may sample another reply the second time.
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=3)
    llama_policy.generate(CHATS[1:2], params)
    first = llama_policy.generate([LONG_CHAT], params)
    assert llama_policy.generate([LONG_CHAT], params) == first
    assert llama_policy.generate([LONG_CHAT], params) == first


def test_a_cached_prompt_gets_the_logits_of_a_fresh_one_on_a_reproducible_server() -> None:
    # What the reproducible server relies on, in llama.cpp itself, on the path the server
    # takes: a prompt evaluated fresh, and the same prompt after a request that began with
    # it (only its last token is evaluated again). With the default batch of 512 the two
    # differ by up to ~1.1 logits on this prompt here (AVX-512); AVX2 kernels differ on
    # short prompts too.
    import llama_cpp

    from policies.models import smollm2_gguf

    llm = llama_cpp.Llama(
        str(smollm2_gguf()), n_batch=REPRODUCIBLE_N_BATCH, n_ctx=2048, n_threads=1, verbose=False
    )
    story = "Tell me a long story about the sea and the stars and the crew. " * 12
    text = (
        "<|im_start|>system\nYou are a pirate.<|im_end|>\n<|im_start|>user\n"
        f"hi, what is the weather like on the ship today, captain? {story}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)

    def last_logits() -> np.ndarray:
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).copy()

    llm.eval([*prompt, 28, 29, 30])  # the previous request: this prompt and a reply
    next(llm.generate(prompt, temp=0.0))  # reuses the cached prompt, evaluates its last token
    cached = last_logits()
    llm.reset()
    llm.eval(prompt)
    assert np.array_equal(last_logits(), cached)


def test_identical_chats_in_one_call_get_different_seeds(llama_policy: OpenAIPolicy) -> None:
    # seed + index: a batch of copies of one chat samples several replies, not one reply n times.
    out = llama_policy.generate([CHATS[0]] * 4, SamplingParams(max_new_tokens=20, temperature=1.0))
    assert len({g.text for g in out}) > 1


def test_concurrent_batch_keeps_order(llama_policy: OpenAIPolicy) -> None:
    # Greedy replies are a fingerprint of each chat: in flight together they must come
    # back in the order asked, equal to asking one at a time.
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    chats = CHATS * 2
    batched = llama_policy.generate(chats, greedy)
    single = [llama_policy.generate([chat], greedy)[0] for chat in CHATS]
    assert batched == single * 2


def test_connection_refused_names_the_url() -> None:
    root = f"http://127.0.0.1:{_free_port()}/v1"
    spec = PolicySpec(backend="openai", base_url=root, max_retries=1)
    with OpenAIPolicy(spec) as policy, pytest.raises(ServerError) as caught:
        policy.generate(CHATS[:1], SamplingParams())
    message = str(caught.value)
    assert f"cannot connect to {root}/chat/completions" in message
    assert "is the server running?" in message
    assert "gave up after 2 attempt(s)" in message


@dataclass
class Scripted:
    """One scripted answer of the stub server."""

    status: int = 200
    body: str = ""
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def valid_body(text: str = "Ahoy!") -> str:
    return json.dumps(
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
        }
    )


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 that answers from a script; the last entry repeats."""

    def __init__(self, script: list[Scripted]) -> None:
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                owner.requests.append((dict(self.headers), json.loads(self.rfile.read(length))))
                answer = owner.script.pop(0) if len(owner.script) > 1 else owner.script[0]
                time.sleep(answer.delay_s)
                payload = answer.body.encode()
                self.send_response(answer.status)
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                # The client may have timed out and hung up first.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(payload)

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def policy(self, **spec: Any) -> OpenAIPolicy:
        return OpenAIPolicy(PolicySpec(backend="openai", base_url=self.root, **spec))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(*script: Scripted) -> ScriptedServer:
        servers.append(ScriptedServer(list(script)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_request_carries_params_seed_per_chat_and_api_key(scripted, monkeypatch) -> None:
    monkeypatch.setenv("FLYWHEEL_TEST_KEY", "sk-test-123")
    server = scripted(Scripted(body=valid_body()))
    params = SamplingParams(max_new_tokens=17, temperature=0.3, top_p=0.9, seed=40)
    with server.policy(model="served-name", api_key_env="FLYWHEEL_TEST_KEY") as policy:
        out = policy.generate(CHATS, params)
    assert out[0].text == "Ahoy!" and (out[0].prompt_tokens, out[0].completion_tokens) == (11, 3)
    bodies = sorted((body for _, body in server.requests), key=lambda body: body["seed"])
    assert [body["seed"] for body in bodies] == [40, 41, 42]
    assert sorted(json.dumps(body["messages"]) for body in bodies) == sorted(
        json.dumps(chat) for chat in CHATS
    )
    for body in bodies:
        assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"]) == (
            "served-name",
            17,
            0.3,
            0.9,
        )
    assert all(headers["Authorization"] == "Bearer sk-test-123" for headers, _ in server.requests)


def test_no_api_key_sends_no_authorization(scripted, monkeypatch) -> None:
    monkeypatch.delenv("FLYWHEEL_TEST_KEY", raising=False)
    server = scripted(Scripted(body=valid_body()))
    with server.policy(api_key_env="FLYWHEEL_TEST_KEY") as policy:
        policy.generate(CHATS[:1], SamplingParams())
    assert "Authorization" not in server.requests[0][0]


def test_bad_status_is_not_retried_and_quotes_the_body(scripted) -> None:
    server = scripted(Scripted(404, '{"error": "model nope not found"}'))
    with server.policy(model="nope") as policy, pytest.raises(ServerError) as caught:
        policy.generate(CHATS[:1], SamplingParams())
    message = str(caught.value)
    assert f"{server.root}/chat/completions answered HTTP 404" in message
    assert "model nope not found" in message
    assert "policy.model='nope'" in message
    assert len(server.requests) == 1


def test_server_errors_are_retried_then_reported(scripted) -> None:
    server = scripted(Scripted(503, "overloaded", headers={"Retry-After": "0"}))
    with server.policy(max_retries=2) as policy, pytest.raises(ServerError) as caught:
        policy.generate(CHATS[:1], SamplingParams())
    assert "HTTP 503: 'overloaded'" in str(caught.value)
    assert "gave up after 3 attempt(s)" in str(caught.value)
    assert len(server.requests) == 3


def test_rate_limit_then_success(scripted) -> None:
    server = scripted(
        Scripted(429, "slow down"), Scripted(500, "oops"), Scripted(body=valid_body())
    )
    with server.policy(max_retries=3) as policy:
        out = policy.generate(CHATS[:1], SamplingParams())
    assert out[0].text == "Ahoy!"
    assert len(server.requests) == 3


def test_timeout_is_named(scripted) -> None:
    server = scripted(Scripted(body=valid_body(), delay_s=1.0))
    with (
        server.policy(timeout_s=0.2, max_retries=0) as policy,
        pytest.raises(ServerError) as caught,
    ):
        policy.generate(CHATS[:1], SamplingParams())
    assert "within policy.timeout_s=0.2 s" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("<html>gateway</html>", "not JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"choices": []}', "no 'choices' list"),
        ('{"choices": [{"text": "hi"}]}', "choices[0] has no 'message' object"),
        ('{"choices": [{"message": {"content": null}}]}', "content is NoneType, not a string"),
        ('{"choices": [{"message": {"content": "hi"}}]}', "no integer 'usage.prompt_tokens'"),
    ],
)
def test_malformed_replies_are_named(scripted, body: str, fragment: str) -> None:
    server = scripted(Scripted(body=body))
    with server.policy() as policy, pytest.raises(ServerError) as caught:
        policy.generate(CHATS[:1], SamplingParams())
    message = str(caught.value)
    assert f"malformed reply from {server.root}/chat/completions" in message
    assert fragment in message


def test_openai_spec_needs_base_url() -> None:
    with pytest.raises(ValueError, match="base_url is required"):
        PolicySpec(backend="openai")


def test_server_that_cannot_start_is_reported(tmp_path) -> None:
    missing = tmp_path / "missing.gguf"
    with (
        pytest.raises(RuntimeError, match=r"llama_cpp\.server exited with code"),
        llama_cpp_server(missing, start_timeout_s=30),
    ):
        pass


def test_generation_benchmark_prints_its_table(
    llama_server: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Smoke test of benchmarks/generation.py on a tiny budget: the running server, no hf.
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generation.py"
    main = runpy.run_path(str(script), run_name="benchmark")["main"]
    args = ["--backends", "--base-url", llama_server, "--batches", "1", "2", "--prompts", "2"]
    main([*args, "--max-new-tokens", "2", "--json", str(tmp_path / "rows.json")])
    out = capsys.readouterr().out
    assert "vector flags:" in out
    assert "| openai | server | 2 | 2 |" in out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["backend"], r["batch"]) for r in rows] == [("openai", 1), ("openai", 2)]
    assert max(r["ratio_vs_baseline"] for r in rows) == 1.0
