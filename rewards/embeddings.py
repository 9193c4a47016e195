"""Sentence embeddings from the packaged all-MiniLM-L6-v2 (sentence-transformers).

One process-wide ``Embedder`` per model folder (``get_embedder``). ``encode`` encodes the
distinct texts of one call in one batched forward pass. Vectors are L2-normalised, so a dot
product is the cosine similarity.

There is deliberately no cache across calls: a text's vector differs in the last float bits
with the batch it was encoded in, so a cache would make features depend on the history of
calls, and a resumed run (which starts with an empty cache) would drift from an
uninterrupted one. Without it, the same calls give the same numbers, in any process.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class Embedder:
    """Batched sentence encoder.

    Args:
        model_path: a sentence-transformers folder; default: the packaged MiniLM
            (``policies.models.minilm_path()``).
        batch_size: texts per forward pass.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        batch_size: int = 64,
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
        self._recurring: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, shape ``(len(texts), dim)``, float32, in input order."""
        distinct = list(dict.fromkeys(texts))
        if not distinct:
            return np.empty((0, self.dim), dtype=np.float32)
        vectors = self._encode(distinct)
        row = {text: i for i, text in enumerate(distinct)}
        return vectors[[row[text] for text in texts]]

    def encode_recurring(self, texts: Sequence[str]) -> np.ndarray:
        """As :meth:`encode`, for the few texts that recur in call after call (a character's
        persona and rules): each is encoded once, alone, and kept. Alone, its vector does not
        depend on its batch neighbours or on which call met it first, so a resumed run sees
        the vectors an uninterrupted one saw."""
        for text in dict.fromkeys(texts):
            if text not in self._recurring:
                self._recurring[text] = self._encode([text])[0]
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        return np.stack([self._recurring[text] for text in texts])

    def _encode(self, distinct: list[str]) -> np.ndarray:
        return self.model.encode(
            distinct,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32)


@functools.cache
def get_embedder(model_path: str | None = None) -> Embedder:
    """The shared ``Embedder`` for ``model_path`` (default: packaged MiniLM), loaded once."""
    return Embedder(model_path)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two equally shaped matrices."""
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.einsum("ij,ij->i", a, b) / np.maximum(norms, 1e-12)
