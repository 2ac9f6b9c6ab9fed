"""Novelty: drop problems too close (embedding cosine) to an existing corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sandlab.config import NoveltyStage
from sandlab.embeddings import embed, inner_product_index
from sandlab.errors import ConfigError
from sandlab.readers import read_stage_input
from sandlab.records import Record
from sandlab.stages import Kind, Stage, StageContext


def filter_novelty(records: list[Record], cfg: NoveltyStage, *, corpus_vectors: np.ndarray | None = None, vectors: np.ndarray | None = None,
                   store: Path | None = None) -> tuple[list[Record], list[Record]]:
    """``corpus_vectors``/``vectors``: precomputed normalized embeddings (benchmarks, huge corpora);
    ``store``: an EmbeddingStore directory for the records' embeddings."""
    corpus: list[str] = []
    for path in cfg.corpora:
        if not Path(path).is_file():
            raise ConfigError(f"data.novelty.corpora: {path} does not exist")
        corpus += [row["problem"] for row in read_stage_input(path) if "problem" in row]  # sandlab records or any reader format
    if (not corpus and corpus_vectors is None) or not records:
        return list(records), []
    if corpus_vectors is None:
        corpus_vectors = embed(corpus, model=cfg.embedding_model, batch_size=cfg.batch_size, device=cfg.embedding_device, cache=True)
    index = inner_product_index(corpus_vectors, ivf_min_records=cfg.ivf_min_records, nprobe=cfg.nprobe)
    queries = vectors if vectors is not None else embed([r["problem"] for r in records], model=cfg.embedding_model, batch_size=cfg.batch_size,
                                                      device=cfg.embedding_device, store=store)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    kept, dropped = [], []
    for rec, score, idx in zip(records, scores[:, 0], ids[:, 0]):
        if score >= cfg.threshold:
            dropped.append({**rec, "reason": "not_novel", "similarity": round(float(score), 4), "nearest_corpus_index": int(idx)})
        else:
            kept.append(rec)
    return kept, dropped


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    return filter_novelty(records, ctx.cfg.data.novelty, store=ctx.embedding_store)


STAGE = Stage("novelty", Kind.DATA, run, config=("data.novelty",), input_fields=("id", "problem"),
              input_hint="every record needs a stable id and a problem", hint="raise data.novelty.threshold")
