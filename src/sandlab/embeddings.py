"""Sentence embeddings (shared by dedup, decontamination and novelty filters)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from sandlab.models import resolve_model_path


@lru_cache(maxsize=2)
def _load(path: str):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    return SentenceTransformer(path, device="cpu")


def embed(texts: list[str], *, model: str = "embedded://all-minilm-l6-v2", batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """L2-normalized float32 embeddings, so inner product = cosine similarity."""
    encoder = _load(resolve_model_path(model, what="data.dedup.embedding_model"))
    vectors = encoder.encode(
        texts, batch_size=batch_size, show_progress_bar=progress and len(texts) > batch_size,
        convert_to_numpy=True, normalize_embeddings=True,
    )
    return np.asarray(vectors, dtype=np.float32)
