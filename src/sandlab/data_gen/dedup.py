"""Deduplication: normalized exact hash, then embedding cosine near-duplicates through faiss."""

from __future__ import annotations

import numpy as np

from sandlab.config import DedupStage
from sandlab.embeddings import embed
from sandlab.records import Record
from sandlab.text import text_key


def dedup(records: list[Record], cfg: DedupStage, *, field: str = "problem") -> tuple[list[Record], list[Record]]:
    """Keep the first of each group of (near-)duplicates, in input order."""
    import faiss  # noqa: PLC0415

    kept, dropped, seen = [], [], {}
    candidates = []
    for rec in records:
        key = text_key(rec[field])
        if key in seen:
            dropped.append({**rec, "reason": "exact_duplicate", "duplicate_of": seen[key]})
        else:
            seen[key] = rec["id"]
            candidates.append(rec)
    if not candidates:
        return kept, dropped
    vectors = embed([r[field] for r in candidates], model=cfg.embedding_model, batch_size=cfg.batch_size)
    index = faiss.IndexFlatIP(vectors.shape[1])
    kept_ids: list[str] = []
    for rec, vec in zip(candidates, vectors):
        if index.ntotal:
            scores, idx = index.search(vec[None, :], 1)
            if scores[0, 0] >= cfg.threshold:
                dropped.append({**rec, "reason": "near_duplicate", "duplicate_of": kept_ids[idx[0, 0]], "similarity": float(scores[0, 0])})
                continue
        index.add(np.ascontiguousarray(vec[None, :]))
        kept_ids.append(rec["id"])
        kept.append(rec)
    return kept, dropped
