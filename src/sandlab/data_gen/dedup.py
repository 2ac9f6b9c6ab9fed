"""Deduplication in three layers, each keeping the first record of a duplicate group (input order):

1. normalized exact hash (whitespace, case, LaTeX formatting ignored),
2. MinHash-LSH over word shingles (near-identical wording),
3. embedding cosine through faiss (paraphrases); exact search for small sets, an IVF index above
   ``DedupStage.ivf_min_records``, so cost grows close to linearly instead of with all pairs.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from sandlab.config import DedupStage
from sandlab.embeddings import embed, inner_product_index
from sandlab.records import Record
from sandlab.stages import Kind, Stage, StageContext
from sandlab.text import normalize_text, text_key, word_ngrams

_MERSENNE = np.uint64((1 << 61) - 1)


def _shingle_hashes(text: str, n: int) -> np.ndarray:
    grams = word_ngrams(normalize_text(text), n)
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(" ".join(g).encode(), digest_size=7).digest(), "little") for g in grams),
        dtype=np.uint64, count=len(grams),
    )


def minhash_signatures(texts: list[str], *, num_perm: int, shingle: int, seed: int = 0) -> np.ndarray:
    """(len(texts), num_perm) MinHash signatures with universal hashing mod 2^61-1."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 30, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 30, size=num_perm, dtype=np.uint64)
    signatures = np.full((len(texts), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i, text in enumerate(texts):
        hashes = _shingle_hashes(text, shingle)
        if hashes.size:
            # 56-bit shingle hashes times 30-bit coefficients stay below 2^64 after the first modulo.
            signatures[i] = ((np.outer(hashes % _MERSENNE, a) + b) % _MERSENNE).min(axis=0)
    return signatures


def minhash_duplicates(signatures: np.ndarray, *, bands: int, threshold: float) -> dict[int, tuple[int, float]]:
    """index -> (earlier kept index, estimated Jaccard) for records whose LSH buckets hold a near-copy."""
    rows = signatures.shape[1] // bands
    buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]
    duplicates: dict[int, tuple[int, float]] = {}
    for i, sig in enumerate(signatures):
        keys = [sig[band * rows : (band + 1) * rows].tobytes() for band in range(bands)]
        best: tuple[int, float] | None = None
        for band, key in enumerate(keys):
            for j in buckets[band].get(key, ()):
                jaccard = float(np.mean(signatures[j] == sig))
                if jaccard >= threshold and (best is None or jaccard > best[1]):
                    best = (j, jaccard)
        if best is not None:
            duplicates[i] = best
            continue
        for band, key in enumerate(keys):  # only kept records represent their bucket
            buckets[band][key].append(i)
    return duplicates


def _neighbours(vectors: np.ndarray, k: int, ivf_min_records: int, nprobe: int):
    index = inner_product_index(vectors, ivf_min_records=ivf_min_records, nprobe=nprobe)
    return index.search(vectors, min(k, len(vectors)))


def embedding_duplicates(vectors: np.ndarray, *, threshold: float, k: int, ivf_min_records: int, nprobe: int) -> dict[int, tuple[int, float]]:
    """index -> (earlier kept index, cosine): greedy keep-first over each record's top-k neighbours."""
    scores, ids = _neighbours(np.ascontiguousarray(vectors, dtype=np.float32), k, ivf_min_records, nprobe)
    duplicates: dict[int, tuple[int, float]] = {}
    for i in range(len(vectors)):
        for score, j in zip(scores[i], ids[i]):
            if 0 <= j < i and score >= threshold and j not in duplicates:
                duplicates[i] = (int(j), float(score))
                break
    return duplicates


def dedup(records: list[Record], cfg: DedupStage, *, field: str = "problem", vectors: np.ndarray | None = None) -> tuple[list[Record], list[Record]]:
    """Keep the first of each group of (near-)duplicates. ``vectors``: precomputed normalized embeddings."""
    dropped: dict[int, Record] = {}
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        key = text_key(rec[field])
        if key in seen:
            dropped[i] = {**rec, "reason": "exact_duplicate", "duplicate_of": records[seen[key]]["id"]}
        else:
            seen[key] = i
    live = [i for i in range(len(records)) if i not in dropped]
    if cfg.minhash and live:
        signatures = minhash_signatures([records[i][field] for i in live], num_perm=cfg.minhash_num_perm, shingle=cfg.minhash_shingle)
        for pos, (other, jaccard) in minhash_duplicates(signatures, bands=cfg.minhash_bands, threshold=cfg.minhash_threshold).items():
            i = live[pos]
            dropped[i] = {**records[i], "reason": "minhash_duplicate", "duplicate_of": records[live[other]]["id"], "jaccard": round(jaccard, 4)}
        live = [i for i in live if i not in dropped]
    if live:
        if vectors is None:
            live_vectors = embed([records[i][field] for i in live], model=cfg.embedding_model, batch_size=cfg.batch_size)
        else:
            live_vectors = vectors[live]
        found = embedding_duplicates(live_vectors, threshold=cfg.threshold, k=cfg.neighbours, ivf_min_records=cfg.ivf_min_records, nprobe=cfg.nprobe)
        for pos, (other, score) in found.items():
            i = live[pos]
            dropped[i] = {**records[i], "reason": "near_duplicate", "duplicate_of": records[live[other]]["id"], "similarity": round(score, 4)}
    kept = [rec for i, rec in enumerate(records) if i not in dropped]
    return kept, [dropped[i] for i in sorted(dropped)]


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    return dedup(records, ctx.cfg.data.dedup)


STAGE = Stage("dedup", Kind.DATA, run, config=("data.dedup",), input_fields=("id", "problem"),
              input_hint="every record needs a stable id and a problem", hint="raise data.dedup.threshold")
