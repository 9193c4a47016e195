"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (sentence-transformers).

One process-wide ``Embedder`` per model folder (``get_embedder``), with an LRU cache per text
so that texts seen every turn (character personas, the same user message scored against
several replies) are encoded once. ``encode`` batches every uncached text in one call.
Vectors are L2-normalised, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_CACHE_SIZE = 50_000  # texts; ~75 MB of float32 384-d vectors


class Embedder:
    """Batched, cached sentence encoder.

    Args:
        model_path: a sentence-transformers folder; default: the packaged MiniLM
            (``policies.models.minilm_path()``).
        batch_size: texts per forward pass.
        cache_size: most texts kept in the LRU cache.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        batch_size: int = 64,
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        # Models come from packages, never from the hub at run time.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        if model_path is None:
            from policies.models import minilm_path

            model_path = minilm_path()
        self.model_path = Path(model_path)
        self.model = SentenceTransformer(str(self.model_path), device="cpu")
        # sentence-transformers >= 6 renamed the accessor; older releases have only the old one.
        get_dim = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension
        )
        self.dim = int(get_dim() or 0)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, shape ``(len(texts), dim)``, float32, in input order."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            vectors = self.model.encode(
                missing,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            for text, vec in zip(missing, vectors, strict=True):
                self._cache[text] = vec.astype(np.float32)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            self._cache.move_to_end(text)
            out[i] = self._cache[text]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


@functools.cache
def get_embedder(model_path: str | None = None) -> Embedder:
    """The shared ``Embedder`` for ``model_path`` (default: packaged MiniLM), loaded once."""
    return Embedder(model_path)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped matrices."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)
