"""hf_engine backend: transformers on this machine, with prefix caching and continuous batching.

Bulk generation for the simulator: a whole day of chats in one call, where most prompt
tokens were seen before (a character's system prompt, a conversation's earlier turns).

- **Prefix caching.** The key/value states of every prompt and reply are kept in blocks of
  :data:`BLOCK_TOKENS` tokens, each keyed by its whole prefix (like vLLM's automatic prefix
  caching), least recently used evicted beyond ``policy.prefix_cache_tokens``. A new
  prompt starts from the longest run of cached blocks and encodes only the rest; the
  count served from the cache is ``Generation.cached_tokens``. The prompts of one call
  always share; states are kept from one call to the next only inside
  :func:`shared_prefixes` (the traffic model opens one per simulated day).
- **Continuous batching.** Up to ``policy.batch_size`` chats decode together; a chat
  leaves the batch at its stop token, and once a quarter of the slots are free the next
  waiting chats are encoded and join the running batch. Rows hold caches of different
  lengths side by side, padded on the left and masked out.
- **Sampling.** Temperature, then top-p (nucleus), then a draw; nothing else (no top-k,
  no min-p). Chat ``i`` draws from its own generator seeded ``params.seed + i``, so its
  random numbers do not depend on its batch neighbours. Its *logits* do, in the last
  bits: a matrix product rounds differently with another batch shape, and a prefix
  served from the cache was computed in another batch. A reply is therefore a function
  of its chat and seed only up to such rounding, which changes a sampled token only when
  a draw falls within rounding of a top-p or cumulative-probability boundary. The same
  chats with the same seed in one call on one machine give identical replies.
- **Stops** at the chat template's end-of-turn or end-of-sequence token
  (:func:`policies.tokens.stop_token_ids`); prompts are built and trimmed exactly as in
  the ``hf`` backend (:func:`policies.tokens.fit_prompt_ids`).
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicLayer

from policies.base import Chat, Generation, SamplingParams, validate_chat
from policies.hardware import resolve_dtype
from policies.hf import load_causal_lm
from policies.spec import PolicySpec
from policies.tokens import fit_prompt_ids, stop_token_ids

BLOCK_TOKENS = 16  # tokens per cached key/value block: the unit of prefix reuse
PREFILL_TOKENS = 8192  # padded prompt tokens per encoding forward pass (bounds activations)
ADMIT_FRACTION = 4  # admit waiting chats once 1/ADMIT_FRACTION of the slots are free
ROOM_TOKENS = 64  # spare key/value room per row, so decode steps append without copying
NUCLEUS_CANDIDATES = 1024  # tokens partially sorted per row to find the top-p nucleus
PROGRESS_MIN_CHATS = 256  # calls this large show a progress bar


@dataclass
class _Block:
    tokens: tuple[int, ...]
    parent: int
    kv: torch.Tensor  # [layers, 2 (key, value), kv_heads, BLOCK_TOKENS, head_dim]


class PrefixCache:
    """Key/value blocks keyed by their whole token prefix; least recently used evicted first.

    A block is found only through the chain of blocks before it, so a hit means the whole
    prefix matched, token for token (the stored tokens are compared, not only hashes).
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_blocks = max_tokens // BLOCK_TOKENS
        self._blocks: OrderedDict[int, _Block] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()

    def _chain(self, ids: Sequence[int], n_blocks: int) -> list[tuple[int, int, tuple[int, ...]]]:
        """(key, parent key, tokens) of the first ``n_blocks`` full blocks of ``ids``."""
        chain, parent = [], 0
        for b in range(n_blocks):
            tokens = tuple(ids[b * BLOCK_TOKENS : (b + 1) * BLOCK_TOKENS])
            key = hash((parent, tokens))
            chain.append((key, parent, tokens))
            parent = key
        return chain

    def lookup(self, ids: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """Tokens of ``ids`` served from the cache and their states ``[layers, 2, heads, n,
        dim]``; at least one token is always left to encode (its logits are needed)."""
        found: list[torch.Tensor] = []
        for key, parent, tokens in self._chain(ids, (len(ids) - 1) // BLOCK_TOKENS):
            block = self._blocks.get(key)
            if block is None or block.parent != parent or block.tokens != tokens:
                break
            self._blocks.move_to_end(key)
            found.append(block.kv)
        if not found:
            return 0, None
        return len(found) * BLOCK_TOKENS, torch.cat(found, dim=3)

    def missing_from(self, ids: Sequence[int], n_tokens: int) -> int:
        """Index of the first full block of ``ids[:n_tokens]`` not cached (touching the
        cached ones), in tokens; ``n_tokens`` rounded down when all are cached."""
        for b, (key, parent, tokens) in enumerate(self._chain(ids, n_tokens // BLOCK_TOKENS)):
            block = self._blocks.get(key)
            if block is None or block.parent != parent or block.tokens != tokens:
                return b * BLOCK_TOKENS
            self._blocks.move_to_end(key)
        return n_tokens // BLOCK_TOKENS * BLOCK_TOKENS

    def store(self, ids: Sequence[int], start: int, kv: torch.Tensor) -> None:
        """Cache the full blocks of ``ids`` from token ``start`` (a block boundary) on, whose
        states ``kv`` (``[layers, 2, heads, n, dim]``) begin at ``start``."""
        if self.max_blocks == 0:
            return
        n_blocks = (start + kv.shape[3]) // BLOCK_TOKENS
        for b, (key, parent, tokens) in enumerate(self._chain(ids, n_blocks)):
            if b * BLOCK_TOKENS < start:
                continue
            offset = b * BLOCK_TOKENS - start
            part = kv[:, :, :, offset : offset + BLOCK_TOKENS].clone()
            self._blocks[key] = _Block(tokens, parent, part)
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)


@dataclass
class _Row:
    """One chat being answered."""

    index: int
    ids: list[int]
    cached: int
    generator: torch.Generator
    generated: list[int] = field(default_factory=list)
    done: bool = False


class _GrowingLayer(DynamicLayer):
    """One layer's key/value states ``[rows, heads, length, dim]`` with spare room behind
    them: a decode step writes its token into the room instead of concatenating the whole
    cache (``DynamicLayer`` copies every state on every step)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int = ROOM_TOKENS) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.length = keys.shape[2]
        self._keys = self._with_room(keys, room)
        self._values = self._with_room(values, room)
        self._view()

    @staticmethod
    def _with_room(states: torch.Tensor, room: int) -> torch.Tensor:
        shape = list(states.shape)
        shape[2] += room
        buffer = states.new_empty(shape)
        buffer[:, :, : states.shape[2]] = states
        return buffer

    def _view(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[2]
        if self.length + n > self._keys.shape[2]:
            room = max(n, self.length)  # doubling: each state is copied O(1) times on average
            self._keys = self._with_room(self.keys, room)
            self._values = self._with_room(self.values, room)
        self._keys[:, :, self.length : self.length + n] = key_states
        self._values[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._view()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


@dataclass
class _Batch:
    """Rows decoding together: each layer's states (padded on the left, with room to grow
    on the right), a mask with 1 where a state is real, and each row's next position."""

    rows: list[_Row]
    layers: list[_GrowingLayer]
    mask: torch.Tensor  # [rows, length], long
    positions: torch.Tensor  # [rows], long: position of the row's next token

    def cache(self) -> Cache:
        return Cache(layers=self.layers)

    def row_states(self, r: int, start: int) -> torch.Tensor:
        """Row ``r``'s real states from its token ``start`` on: ``[layers, 2, heads, n, dim]``."""
        columns = self.mask[r].nonzero().squeeze(1)[start:]
        keys = torch.stack([layer.keys[r][:, columns] for layer in self.layers])
        values = torch.stack([layer.values[r][:, columns] for layer in self.layers])
        return torch.stack([keys, values], dim=1)


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _merge(a: _Batch | None, b: _Batch) -> _Batch:
    """One batch holding the rows of both, states aligned on the right."""
    if a is None:
        return b
    length = max(a.mask.shape[1], b.mask.shape[1])

    def cat(x: torch.Tensor, y: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([_left_pad(x, length, dim), _left_pad(y, length, dim)])

    return _Batch(
        rows=a.rows + b.rows,
        layers=[
            _GrowingLayer(cat(x.keys, y.keys, 2), cat(x.values, y.values, 2))
            for x, y in zip(a.layers, b.layers, strict=True)
        ],
        mask=cat(a.mask, b.mask, 1),
        positions=torch.cat([a.positions, b.positions]),
    )


def _keep(batch: _Batch, keep: list[int]) -> _Batch | None:
    """The batch without the rows not in ``keep``, and without columns no row uses."""
    if not keep:
        return None
    index = torch.tensor(keep)
    mask = batch.mask.index_select(0, index)
    first = int(mask.any(0).nonzero()[0])  # leading columns that were only padding
    return _Batch(
        rows=[batch.rows[i] for i in keep],
        layers=[
            _GrowingLayer(
                layer.keys.index_select(0, index)[:, :, first:],
                layer.values.index_select(0, index)[:, :, first:],
            )
            for layer in batch.layers
        ],
        mask=mask[:, first:],
        positions=batch.positions.index_select(0, index),
    )


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generators: Sequence[torch.Generator]
) -> list[int]:
    """One token per row of ``logits`` ``[rows, vocab]``: greedy at temperature 0, else
    temperature, then the smallest set of tokens whose probability reaches ``top_p``,
    then a draw from row ``i``'s own generator.

    The nucleus is looked for among the :data:`NUCLEUS_CANDIDATES` most probable tokens
    (a partial sort), and among all of them only for a row whose candidates fall short of
    ``top_p``: the same set as a full sort, without sorting the vocabulary on every step.
    """
    if temperature == 0:
        return logits.argmax(-1).tolist()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    k = probs.shape[-1] if top_p >= 1 else min(NUCLEUS_CANDIDATES, probs.shape[-1])
    top, order = probs.topk(k, dim=-1)
    tokens = []
    for r, generator in enumerate(generators):
        row_top, row_order = top[r], order[r]
        if top_p < 1 and float(row_top.sum()) < top_p:  # a flat row: its nucleus is wider
            row_top, row_order = probs[r].sort(descending=True)
        if top_p < 1:
            mass_before = row_top.cumsum(-1) - row_top
            row_top = row_top.masked_fill(mass_before >= top_p, 0)  # the top token stays
        tokens.append(int(row_order[torch.multinomial(row_top, 1, generator=generator)]))
    return tokens


_ENGINES: weakref.WeakSet[EnginePolicy] = weakref.WeakSet()
_shared_depth = 0  # open shared_prefixes() blocks


@contextmanager
def shared_prefixes() -> Iterator[None]:
    """Within this block every engine keeps prefix states from one call for the next.

    Outside it, each call starts from an empty cache (prompts of one call still share
    their prefixes). What a cache hit serves was computed in another batch and can differ
    from a fresh encoding in the last bits (more often in bf16), enough to flip a sampled
    token; so a call's replies depend on the calls before it only inside such a block. The
    traffic model opens one per simulated day, its unit of checkpointing: a day resumed
    from its checkpoint meets the same (empty) cache as in an uninterrupted run.
    """
    global _shared_depth
    _clear_all()
    _shared_depth += 1
    try:
        yield
    finally:
        _shared_depth -= 1
        _clear_all()


def _call_key(chats: Sequence[Chat], params: SamplingParams) -> tuple:
    return (tuple(tuple((m.get("role"), m.get("content")) for m in chat) for chat in chats), params)


def _clear_all() -> None:
    for engine in list(_ENGINES):
        engine.cache.clear()


class EnginePolicy:
    """A transformers causal LM answering large batches of chats with prefix caching and
    continuous batching (see the module docstring for what a seed guarantees)."""

    def __init__(self, spec: PolicySpec | None = None) -> None:
        self.spec = spec or PolicySpec(backend="hf_engine")
        self.name = self.spec.label
        self.model, self.tokenizer = load_causal_lm(self.spec.model, resolve_dtype(self.spec.dtype))
        self.stop_ids = set(stop_token_ids(self.tokenizer))
        if isinstance(self.model.generation_config.eos_token_id, int):
            self.stop_ids.add(self.model.generation_config.eos_token_id)
        self.pad_id = self.tokenizer.pad_token_id
        self.cache = PrefixCache(self.spec.prefix_cache_tokens)
        self._ready: dict[tuple, list[list[Generation]]] = {}  # filled by together()
        _ENGINES.add(self)

    def generate(self, chats: Sequence[Chat], params: SamplingParams) -> list[Generation]:
        """One reply per chat, in order; chat ``i`` is sampled with seed ``params.seed + i``."""
        prepared = self._ready.get(_call_key(chats, params))
        if prepared:
            return prepared.pop(0)
        return self._run([(chats, params)])[0]

    @contextmanager
    def together(self, calls: Sequence[tuple[Sequence[Chat], SamplingParams]]) -> Iterator[None]:
        """Answer several calls in ONE continuous batch; inside the block, ``generate`` with
        one of these (chats, params) returns its share of the joint run.

        This is how two arms that wrap the same model (a planted or safety wrapper passes
        its chats through unchanged) fill one batch instead of two half-full ones. Each
        call keeps its seeds (its chat ``i`` draws with ``params.seed + i``), so a reply is
        the one its own call would give up to the rounding the module docstring describes.
        The calls must agree on every sampling setting but the seed; replies nobody asked
        for by the end of the block are dropped.
        """
        shared = {(p.max_new_tokens, p.temperature, p.top_p) for _, p in calls}
        if len(shared) > 1:
            raise ValueError(
                f"together() got calls with different sampling settings {sorted(shared)} "
                "(max_new_tokens, temperature, top_p); answer them with separate generate calls"
            )
        for (chats, params), replies in zip(calls, self._run(calls), strict=True):
            self._ready.setdefault(_call_key(chats, params), []).append(replies)
        try:
            yield
        finally:
            self._ready.clear()

    @torch.inference_mode()
    def _run(
        self, calls: Sequence[tuple[Sequence[Chat], SamplingParams]]
    ) -> list[list[Generation]]:
        """The replies of every call, decoded in one continuous batch."""
        chats = [chat for call_chats, _ in calls for chat in call_chats]
        seeds = [params.seed + i for call_chats, params in calls for i in range(len(call_chats))]
        for i, chat in enumerate(chats):
            validate_chat(chat, i)
        params = calls[0][1] if calls else SamplingParams()
        if not _shared_depth:
            self.cache.clear()
        prompts = [fit_prompt_ids(self.tokenizer, c, self.spec.max_prompt_tokens) for c in chats]
        # Longest first: rows encoded together then need little padding, and long prompts
        # do not trail behind at the end of the call.
        waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
        results: dict[int, Generation] = {}
        quiet = len(chats) < PROGRESS_MIN_CHATS or os.environ.get("FLYWHEEL_QUIET") == "1"
        bar = tqdm(total=len(chats), desc=f"generate {self.name}", unit="reply", disable=quiet)
        batch: _Batch | None = None
        slots = self.spec.batch_size
        while waiting or batch is not None:
            active = len(batch.rows) if batch is not None else 0
            if waiting and slots - active >= max(1, slots // ADMIT_FRACTION):
                group = [waiting.popleft() for _ in range(min(slots - active, len(waiting)))]
                rows = [self._new_row(i, prompts[i], seeds[i]) for i in group]
                for part in self._prefill(rows, params):
                    batch = _merge(batch, part)
            else:
                self._decode(batch, params)
            batch = self._retire(batch, params, results, bar)
        bar.close()
        replies, start = [], 0
        for call_chats, _ in calls:
            replies.append([results[i] for i in range(start, start + len(call_chats))])
            start += len(call_chats)
        return replies

    def _new_row(self, index: int, ids: list[int], seed: int) -> _Row:
        return _Row(index, ids, 0, torch.Generator().manual_seed(seed))

    def _prefill(self, rows: list[_Row], params: SamplingParams) -> list[_Batch]:
        """Encode the uncached part of each row's prompt and sample its first token, in
        forward passes of at most :data:`PREFILL_TOKENS` padded tokens."""
        cached = [self.cache.lookup(row.ids) for row in rows]
        for row, (n, _) in zip(rows, cached, strict=True):
            row.cached = n
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids) - rows[i].cached)
        parts, start = [], 0
        while start < len(order):
            end = start + 1
            while end < len(order):
                width = len(rows[order[end]].ids) - rows[order[end]].cached
                if (end + 1 - start) * width > PREFILL_TOKENS:
                    break
                end += 1
            chosen = order[start:end]
            part, logits = self._encode([rows[i] for i in chosen], [cached[i][1] for i in chosen])
            self._sample_into(part, logits, params)
            parts.append(part)
            start = end
        return parts

    def _encode(
        self, rows: list[_Row], prefixes: list[torch.Tensor | None]
    ) -> tuple[_Batch, torch.Tensor]:
        """Run the uncached prompt tokens of ``rows`` after their cached states; the batch
        and each row's last logits."""
        width = max(len(r.ids) - r.cached for r in rows)
        past = max(r.cached for r in rows)
        config = self.model.config
        heads = config.num_key_value_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        n_layers = config.num_hidden_layers
        dtype = self.model.dtype
        keys = [torch.zeros(len(rows), heads, past, dim, dtype=dtype) for _ in range(n_layers)]
        values = [torch.zeros(len(rows), heads, past, dim, dtype=dtype) for _ in range(n_layers)]
        mask = torch.zeros(len(rows), past + width, dtype=torch.long)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (row, prefix) in enumerate(zip(rows, prefixes, strict=True)):
            new = row.ids[row.cached :]
            if prefix is not None:
                for layer in range(n_layers):
                    keys[layer][r, :, past - row.cached :] = prefix[layer, 0]
                    values[layer][r, :, past - row.cached :] = prefix[layer, 1]
            mask[r, past - row.cached : past] = 1
            mask[r, past + width - len(new) :] = 1
            input_ids[r, width - len(new) :] = torch.tensor(new)
            position_ids[r, width - len(new) :] = torch.arange(row.cached, len(row.ids))
        room = width + ROOM_TOKENS  # the prompt's new tokens, then the first decode steps
        layers = [_GrowingLayer(k, v, room) for k, v in zip(keys, values, strict=True)]
        cache = Cache(layers=layers)
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        batch = _Batch(  # the layers now hold the prompt tokens' states too
            rows=rows,
            layers=layers,
            mask=mask,
            positions=torch.tensor([len(r.ids) for r in rows]),
        )
        for r, row in enumerate(rows):  # share this prompt's new blocks with later rows at once
            start = self.cache.missing_from(row.ids, len(row.ids))
            if start < len(row.ids) // BLOCK_TOKENS * BLOCK_TOKENS:
                self.cache.store(row.ids, start, batch.row_states(r, start))
        return batch, out.logits[:, -1]

    def _decode(self, batch: _Batch, params: SamplingParams) -> None:
        """Feed every row its last sampled token and sample the next."""
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        tokens = torch.tensor([[row.generated[-1]] for row in batch.rows])
        out = self.model(
            input_ids=tokens,
            attention_mask=batch.mask,
            position_ids=batch.positions[:, None],
            cache=batch.cache(),
            use_cache=True,
        )
        batch.positions = batch.positions + 1
        self._sample_into(batch, out.logits[:, -1], params)

    def _sample_into(self, batch: _Batch, logits: torch.Tensor, params: SamplingParams) -> None:
        tokens = sample_next(
            logits, params.temperature, params.top_p, [row.generator for row in batch.rows]
        )
        for row, token in zip(batch.rows, tokens, strict=True):
            row.generated.append(token)
            row.done = token in self.stop_ids or len(row.generated) >= params.max_new_tokens

    def _retire(
        self, batch: _Batch | None, params: SamplingParams, results: dict[int, Generation], bar
    ) -> _Batch | None:
        """Turn finished rows into Generations, cache their states, drop them from the batch."""
        if batch is None:
            return None
        keep = []
        for r, row in enumerate(batch.rows):
            if not row.done:
                keep.append(r)
                continue
            sequence = row.ids + row.generated[:-1]  # the last token was never fed
            start = self.cache.missing_from(sequence, len(sequence))
            if start < len(sequence) // BLOCK_TOKENS * BLOCK_TOKENS:
                self.cache.store(sequence, start, batch.row_states(r, start))
            results[row.index] = self._generation(row)
            bar.update(1)
        return _keep(batch, keep) if len(keep) < len(batch.rows) else batch

    def _generation(self, row: _Row) -> Generation:
        completion = row.generated
        if completion and completion[-1] in self.stop_ids:
            completion = completion[:-1]
        return Generation(
            text=self.tokenizer.decode(completion, skip_special_tokens=True).strip(),
            prompt_tokens=len(row.ids),
            completion_tokens=len(completion),
            completion_ids=tuple(row.generated),
            cached_tokens=row.cached,
        )
