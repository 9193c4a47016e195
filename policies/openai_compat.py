"""openai backend: a client for any OpenAI-compatible ``/v1/chat/completions`` server.

vLLM's server, llama.cpp's server (``python -m llama_cpp.server``) and hosted APIs all
speak this protocol, so the simulator can drive a bigger model on another machine without
a line of code changing: only ``policy.base_url`` and ``policy.model`` in the scenario.

One ``generate`` call sends one request per chat, up to ``spec.batch_size`` in flight at
once; a server that batches internally (vLLM does, continuous batching) turns them into
one forward pass, a server that serialises them (llama-cpp-python's does) simply queues
them. Each request carries ``seed + index`` so that replies differ from chat to chat but a
repeated call with the same seed asks for the same thing.

What a seed guarantees is the server's business. The seed fixes the sampler's random
draws; the reply repeats only if the logits repeat to the last bit, and servers compute
them differently depending on how a prompt was batched. llama-cpp-python's server always
reuses the KV cache of the common prefix with the request it answered before and
evaluates only the rest (llama.cpp's own server does the same unless the request sends
``cache_prompt: false``), and its batched and single-token kernels round differently. So
the same chat under the same seed can get another reply when another request came before
it, e.g. when several are in flight and arrive in another order. :func:`llama_cpp_server`
with ``reproducible=True`` evaluates prompts one token at a time, which makes a reply a
function of its chat and seed alone (tests/test_policies_openai.py checks both). vLLM
batches requests together and does not promise batch-invariant logits either.

Transient failures (connection errors, timeouts, HTTP 429 and 5xx) are retried with
jittered exponential backoff, honouring ``Retry-After``; everything else fails at once with
an error naming the URL, what came back and the likely fix. ``spec.timeout_s`` is the wait
for one reply *including the time it queues at the server*: against a server that
serialises requests, size it for ``batch_size`` replies, not one. Unlike the hf backend this one
does not trim long histories: the client has no tokenizer, so a prompt past the server's
context window comes back as the server's own HTTP 400, quoted in the error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from policies.base import Chat, Generation, SamplingParams, validate_chat
from policies.spec import PolicySpec

INITIAL_BACKOFF_S = 0.5  # seconds before the first retry; doubles each retry, plus jitter
MAX_BACKOFF_S = 20.0  # seconds; also caps a server's Retry-After
BODY_SNIPPET_CHARS = 300  # how much of a bad reply an error message quotes
RETRIED_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_USAGE_KEYS = ("prompt_tokens", "completion_tokens")


class ServerError(RuntimeError):
    """An OpenAI-compatible server could not be reached, refused a request or answered badly."""


class TransientServerError(ServerError):
    """A failure worth retrying: the connection, a timeout, HTTP 429 or a 5xx."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


_jittered_backoff = wait_exponential_jitter(
    multiplier=INITIAL_BACKOFF_S, max=MAX_BACKOFF_S, jitter=INITIAL_BACKOFF_S
)


def _backoff(state: RetryCallState) -> float:
    """Jittered exponential backoff, or the server's Retry-After when that is longer."""
    error = state.outcome.exception() if state.outcome else None
    retry_after = getattr(error, "retry_after_s", None) or 0.0
    return min(MAX_BACKOFF_S, max(_jittered_backoff(state), retry_after))


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= BODY_SNIPPET_CHARS else text[:BODY_SNIPPET_CHARS] + "..."


def _retry_after_s(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:  # absent, or an HTTP date: fall back to our own backoff
        return None


class OpenAIPolicy:
    """Chats answered by an OpenAI-compatible server at ``spec.base_url``."""

    def __init__(self, spec: PolicySpec) -> None:
        if spec.backend != "openai" or not spec.base_url:
            raise ValueError(
                f"OpenAIPolicy needs backend='openai' and a base_url, got backend={spec.backend!r} "
                f"base_url={spec.base_url!r}; set policy.base_url, e.g. http://127.0.0.1:8000/v1"
            )
        self.spec = spec
        self.name = spec.label
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        api_key = os.environ.get(spec.api_key_env)
        if api_key:  # local servers (llama.cpp, vLLM without --api-key) need none
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(spec.timeout_s),
            limits=httpx.Limits(
                max_connections=spec.batch_size, max_keepalive_connections=spec.batch_size
            ),
        )
        # Threads rather than asyncio: generate() must also work when the caller already
        # runs an event loop (Streamlit, Jupyter), where asyncio.run() is refused.
        self._pool = ThreadPoolExecutor(spec.batch_size, thread_name_prefix="openai-policy")

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """One reply per chat, in order; chat ``i`` is sampled with seed ``params.seed + i``."""
        for i, chat in enumerate(chats):
            validate_chat(chat, i)
        futures = [
            self._pool.submit(self._complete, chat, params, params.seed + i)
            for i, chat in enumerate(chats)
        ]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:  # after a failure, do not keep the server busy for nothing
                future.cancel()

    def close(self) -> None:
        """Release the connection pool and the worker threads."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    def __enter__(self) -> OpenAIPolicy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def payload(self, chat: Chat, params: SamplingParams, seed: int) -> dict[str, Any]:
        """The request body for one chat: our sampling params in OpenAI's names."""
        return {
            "model": self.spec.model,
            "messages": chat,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": seed,
            "stream": False,
        }

    def _complete(self, chat: Chat, params: SamplingParams, seed: int) -> Generation:
        attempts = self.spec.max_retries + 1
        retrying = Retrying(
            retry=retry_if_exception_type(TransientServerError),
            stop=stop_after_attempt(attempts),
            wait=_backoff,
            reraise=True,
        )
        try:
            body = retrying(self._post, self.payload(chat, params, seed))
        except TransientServerError as error:
            raise ServerError(f"{error} (gave up after {attempts} attempt(s))") from error
        return parse_reply(body, self.url)

    def _post(self, payload: dict[str, Any]) -> str:
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.ConnectError as error:
            raise TransientServerError(
                f"cannot connect to {self.url} ({error}); is the server running? Start one, e.g. "
                "`python -m llama_cpp.server --model MODEL.gguf --port 8000` or `vllm serve MODEL`, "
                "and set policy.base_url to its /v1 root"
            ) from error
        except httpx.TimeoutException as error:
            raise TransientServerError(
                f"no reply from {self.url} within policy.timeout_s={self.spec.timeout_s} s "
                f"({type(error).__name__}); raise policy.timeout_s or lower policy.batch_size"
            ) from error
        except httpx.TransportError as error:
            raise TransientServerError(
                f"connection to {self.url} failed: {type(error).__name__}: {error}"
            ) from error
        if response.status_code == 200:
            return response.text
        message = (
            f"{self.url} answered HTTP {response.status_code}: {_snippet(response.text)!r}"
            f"{self._hint(response.status_code)}"
        )
        if response.status_code in RETRIED_STATUSES:
            raise TransientServerError(message, retry_after_s=_retry_after_s(response))
        raise ServerError(message)

    def _hint(self, status: int) -> str:
        if status in (401, 403):
            return f"; put a valid API key in the environment variable ${self.spec.api_key_env}"
        if status == 404:
            return (
                f"; check that policy.base_url is the API root (usually ends in /v1) and that "
                f"the server serves policy.model={self.spec.model!r}"
            )
        if status in (400, 422):
            return "; the server rejected the request (prompt longer than its context window?)"
        return ""


def parse_reply(body: str, url: str) -> Generation:
    """Text and token counts of one chat-completions reply; a clear error if it is malformed."""

    def malformed(what: str) -> ServerError:
        return ServerError(
            f"malformed reply from {url}: {what}; body starts {_snippet(body)!r}; "
            "is policy.base_url an OpenAI-compatible chat-completions server?"
        )

    try:
        reply = json.loads(body)
    except json.JSONDecodeError as error:
        raise malformed(f"not JSON ({error.msg})") from error
    if not isinstance(reply, dict):
        raise malformed(f"expected a JSON object, got {type(reply).__name__}")
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices:
        raise malformed("no 'choices' list")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise malformed("choices[0] has no 'message' object")
    content = message.get("content")
    if not isinstance(content, str):
        raise malformed(f"choices[0].message.content is {type(content).__name__}, not a string")
    usage = reply.get("usage")
    counts = [usage.get(key) if isinstance(usage, dict) else None for key in _USAGE_KEYS]
    if not all(isinstance(count, int) for count in counts):
        raise malformed(
            "no integer 'usage.prompt_tokens' and 'usage.completion_tokens' (token counts)"
        )
    return Generation(content.strip(), counts[0], counts[1])


SERVER_START_TIMEOUT_S = 60.0  # seconds; the packaged 135M GGUF loads in about one
# Prompt tokens per forward pass of a reproducible llama.cpp server: with one, a token's
# logits are computed the same way whether its prompt was cached or not.
REPRODUCIBLE_N_BATCH = 1


@contextlib.contextmanager
def llama_cpp_server(
    model_path: Path | None = None,
    *,
    alias: str = "smollm2",
    n_threads: int = 2,
    reproducible: bool = False,
    start_timeout_s: float = SERVER_START_TIMEOUT_S,
) -> Iterator[str]:
    """Run llama-cpp-python's OpenAI-compatible server on a free 127.0.0.1 port; yield its
    /v1 root, and stop it on exit. The model defaults to the packaged SmolLM2 GGUF, served
    under ``alias`` (use that as ``policy.model``). For tests, benchmarks and local demos.

    ``reproducible=True`` evaluates prompts one token at a time (``--n_batch 1``), so a
    reply depends only on its chat and seed, not on which request the server answered
    before (see the module docstring); prompt processing is then several times slower.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        raise ModuleNotFoundError(
            "llama-cpp-python's server is not installed; fix: pip install 'llama-cpp-python[server]'"
        )
    if model_path is None:
        from policies.models import smollm2_gguf

        model_path = smollm2_gguf()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = f"http://127.0.0.1:{port}/v1"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model_path),
        "--model_alias",
        alias,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # Prompt evaluation has its own thread count (all cores by default); on a busy
        # machine threads that wait for each other at every layer stall, so cap both.
        "--n_threads",
        str(n_threads),
        "--n_threads_batch",
        str(n_threads),
        *(["--n_batch", str(REPRODUCIBLE_N_BATCH)] if reproducible else []),
        "--verbose",
        "False",
    ]
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_until_serving(process, root, log, start_timeout_s)
            yield root
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_serving(process: subprocess.Popen, root: str, log: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(
                f"llama_cpp.server exited with code {process.returncode} before serving "
                f"{root}; its output:\n{log.read()[-2000:]}"
            )
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{root}/models", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    log.seek(0)
    raise RuntimeError(
        f"llama_cpp.server did not serve {root} within {timeout_s} s; its output:\n"
        f"{log.read()[-2000:]}"
    )
