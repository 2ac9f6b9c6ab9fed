"""Sentence embeddings (shared by dedup, decontamination and novelty filters)."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import numpy as np

from sandlab.models import cache_dir, resolve_model_path


@lru_cache(maxsize=2)
def _load(path: str):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    return SentenceTransformer(path, device="cpu")


def embed(
    texts: list[str], *, model: str = "embedded://all-minilm-l6-v2", batch_size: int = 64, progress: bool = True, cache: bool = False
) -> np.ndarray:
    """L2-normalized float32 embeddings, so inner product = cosine similarity.

    ``cache=True`` keeps the result on disk keyed by model and texts: for fixed sets embedded on every
    run (the test benchmarks in decontamination).
    """
    path = resolve_model_path(model, what="embedding_model")
    if cache:
        digest = hashlib.sha1("\x1e".join([path, *texts]).encode()).hexdigest()
        cached = cache_dir() / "embeddings" / f"{digest}.npy"
        if cached.exists():
            return np.load(cached)
        vectors = embed(texts, model=model, batch_size=batch_size, progress=progress)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}-{os.getpid()}.npy")
        np.save(tmp, vectors)
        os.replace(tmp, cached)
        return vectors
    encoder = _load(path)
    vectors = encoder.encode(
        texts, batch_size=batch_size, show_progress_bar=progress and len(texts) > batch_size,
        convert_to_numpy=True, normalize_embeddings=True,
    )
    return np.asarray(vectors, dtype=np.float32)


def inner_product_index(vectors: np.ndarray, *, ivf_min_records: int = 20000, nprobe: int = 8):
    """A faiss inner-product index over normalized ``vectors``: exact (flat) below ``ivf_min_records``,
    IVF above it (about 4*sqrt(n) lists, ``nprobe`` searched), so search cost grows close to linearly
    with the corpus instead of with all pairs."""
    import faiss  # noqa: PLC0415

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    if n < ivf_min_records:
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors[np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)])
        index.nprobe = nprobe
    index.add(vectors)
    return index
