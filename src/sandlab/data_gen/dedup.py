"""Deduplication in three layers, each keeping the first record of a duplicate group (input order):

1. normalized exact hash (whitespace, case, LaTeX formatting ignored),
2. MinHash-LSH over word shingles (near-identical wording),
3. embedding cosine (paraphrases): exact for small sets, an inverted-file self-join over faiss k-means
   cells above ``DedupStage.ivf_min_records``, so cost grows close to linearly instead of with all pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sandlab.config import DedupStage
from sandlab.embeddings import embed, similar_pairs
from sandlab.records import Record
from sandlab.stages import Kind, Stage, StageContext
from sandlab.text import ROLL, fmix64, ngram_hashes, normalize_text, word_hashes

# Cost at scale: per record only normalization and a dict lookup per word run in Python; shingle hashes,
# the 32-bit permutations, band keys, candidate pairs and their Jaccard estimates are numpy over all
# records at once (docs/PERFORMANCE.md, "Dedup and decontamination of real text").

# Each record is compared with at most this many earlier members of one LSH bucket per band: a bucket
# of hundreds of records that share a band without being near-copies (templated problems) would
# otherwise cost all its pairs; a near-copy still meets its original in the other bands.
MAX_BUCKET_SPAN = 256


def minhash_signatures(texts: list[str], *, num_perm: int, shingle: int, seed: int = 0, block: int = 256,
                       normalized: bool = False) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures over word shingles of the normalized texts
    (``normalized=True``: already normalized): permutation k of a shingle's hash h is
    (a_k * h32 + b_k) mod 2^32 for odd a_k, then an xor-shift, where h32 are 32 well-mixed bits of h;
    a text without words has the all-max signature. ``block`` texts at a time: their permuted shingles
    (block x shingles x num_perm) stay in the CPU cache, 3x faster than 4096 at a time."""
    rng = np.random.default_rng(seed)
    a = (rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint32) << np.uint32(1)) | np.uint32(1)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    hashes, lengths, starts = word_hashes(texts if normalized else [normalize_text(t) for t in texts])
    grams, owner = ngram_hashes(hashes, lengths, starts, shingle)
    grams32 = (grams >> np.uint64(32)).astype(np.uint32)
    signatures = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    counts = np.bincount(owner, minlength=len(texts))
    first = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    with np.errstate(over="ignore"):
        for lo in range(0, len(texts), block):
            hi = min(lo + block, len(texts))
            rows = np.flatnonzero(counts[lo:hi]) + lo
            if not rows.size:
                continue
            chunk = grams32[first[lo] : first[hi]]
            permuted = chunk[:, None] * a + b
            permuted ^= permuted >> np.uint32(15)
            signatures[rows] = np.minimum.reduceat(permuted, first[rows] - first[lo], axis=0)
    return signatures


def _band_keys(signatures: np.ndarray, bands: int) -> np.ndarray:
    """(bands, n) uint64: one hash per band of ``rows`` consecutive signature values."""
    rows = signatures.shape[1] // bands
    keys = np.empty((bands, len(signatures)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            part = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
            h = np.full(len(signatures), band + 1, dtype=np.uint64)
            for r in range(rows):
                h = fmix64(h * ROLL ^ part[:, r])
            keys[band] = h
    return keys


def minhash_duplicates(signatures: np.ndarray, *, bands: int, threshold: float) -> dict[int, tuple[int, float]]:
    """index -> (earlier kept index, estimated Jaccard) for records whose LSH buckets hold a near-copy.

    Greedy keep-first, as one pass in input order would decide it: a record is a duplicate of the
    earlier *kept* record sharing one of its band buckets with the highest estimated Jaccard (ties:
    the earliest), if that reaches ``threshold``. Candidate pairs come from sorting each band's keys.
    """
    n = len(signatures)
    if n < 2:
        return {}
    pair_keys = []
    for keys in _band_keys(signatures, bands):
        order = np.argsort(keys, kind="stable")  # equal keys stay in input order, so j < i below
        ordered = keys[order]
        for d in range(1, min(MAX_BUCKET_SPAN, n - 1) + 1):
            same = np.flatnonzero(ordered[:-d] == ordered[d:])
            if not same.size:
                break
            pair_keys.append(order[same + d].astype(np.int64) * n + order[same])
    if not pair_keys:
        return {}
    pairs = np.unique(np.concatenate(pair_keys))
    later, earlier = pairs // n, pairs % n
    jaccard = np.empty(len(pairs))
    for lo in range(0, len(pairs), 1 << 16):
        hi = lo + (1 << 16)
        jaccard[lo:hi] = (signatures[later[lo:hi]] == signatures[earlier[lo:hi]]).mean(axis=1)
    close = jaccard >= threshold
    duplicates: dict[int, tuple[int, float]] = {}
    # Pairs are sorted by (later, earlier): each record's candidates come together, after every earlier record's.
    for i, j, score in zip(later[close].tolist(), earlier[close].tolist(), jaccard[close].tolist()):
        if j in duplicates:
            continue
        best = duplicates.get(i)
        if best is None or score > best[1]:
            duplicates[i] = (j, score)
    return duplicates


def embedding_duplicates(vectors: np.ndarray, *, threshold: float, k: int, ivf_min_records: int, nprobe: int) -> dict[int, tuple[int, float]]:
    """index -> (earlier kept index, cosine): greedy keep-first over each record's k closest earlier
    records at or above the threshold (``similar_pairs``)."""
    rows, others, scores = similar_pairs(vectors, threshold=threshold, k=k, ivf_min_records=ivf_min_records, nprobe=nprobe)
    duplicates: dict[int, tuple[int, float]] = {}
    # Sorted by row, then cosine descending: each row meets its best earlier record that was kept.
    for i, j, score in zip(rows.tolist(), others.tolist(), scores.tolist()):
        if i not in duplicates and j not in duplicates:
            duplicates[i] = (j, score)
    return duplicates


def dedup(records: list[Record], cfg: DedupStage, *, field: str = "problem", vectors: np.ndarray | None = None,
          store: Path | None = None) -> tuple[list[Record], list[Record]]:
    """Keep the first of each group of (near-)duplicates. ``vectors``: precomputed normalized embeddings;
    ``store``: an EmbeddingStore directory to take them from and add them to."""
    dropped: dict[int, Record] = {}
    seen: dict[str, int] = {}
    normalized = [normalize_text(rec[field]) for rec in records]  # once, for the exact keys and the shingles
    for i, rec in enumerate(records):
        key = normalized[i]
        if key in seen:
            dropped[i] = {**rec, "reason": "exact_duplicate", "duplicate_of": records[seen[key]]["id"]}
        else:
            seen[key] = i
    live = [i for i in range(len(records)) if i not in dropped]
    if cfg.minhash and live:
        signatures = minhash_signatures([normalized[i] for i in live], num_perm=cfg.minhash_num_perm, shingle=cfg.minhash_shingle, normalized=True)
        for pos, (other, jaccard) in minhash_duplicates(signatures, bands=cfg.minhash_bands, threshold=cfg.minhash_threshold).items():
            i = live[pos]
            dropped[i] = {**records[i], "reason": "minhash_duplicate", "duplicate_of": records[live[other]]["id"], "jaccard": round(jaccard, 4)}
        live = [i for i in live if i not in dropped]
    if live:
        if vectors is None:
            live_vectors = embed([records[i][field] for i in live], model=cfg.embedding_model, batch_size=cfg.batch_size, device=cfg.embedding_device,
                                 store=store)
        else:
            live_vectors = vectors[live]
        found = embedding_duplicates(live_vectors, threshold=cfg.threshold, k=cfg.neighbours, ivf_min_records=cfg.ivf_min_records, nprobe=cfg.nprobe)
        for pos, (other, score) in found.items():
            i = live[pos]
            dropped[i] = {**records[i], "reason": "near_duplicate", "duplicate_of": records[live[other]]["id"], "similarity": round(score, 4)}
    kept = [rec for i, rec in enumerate(records) if i not in dropped]
    return kept, [dropped[i] for i in sorted(dropped)]


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    return dedup(records, ctx.cfg.data.dedup, store=ctx.embedding_store)


STAGE = Stage("dedup", Kind.DATA, run, config=("data.dedup",), input_fields=("id", "problem"),
              input_hint="every record needs a stable id and a problem", hint="raise data.dedup.threshold")
