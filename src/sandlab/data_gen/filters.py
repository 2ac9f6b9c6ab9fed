"""Model-based filters of the SAND pipeline:

* ``rate_difficulty``: a judge model rates each problem 1-10 in 0.5 steps, several times, averaged;
  problems outside a configured window are dropped.
* ``filter_by_pass_rate``: a student model samples m answers per problem; items are kept by pass-rate
  window (SAND keeps what the student fails; AM-Thinking keeps 0 < pass rate < 1 for RL).
* ``filter_novelty``: drop problems too close (embedding cosine) to an existing corpus.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

import numpy as np

from sandlab.config import DifficultyStage, NoveltyStage, PassRateStage
from sandlab.data_gen.prompts import load_prompt
from sandlab.embeddings import embed, inner_product_index
from sandlab.errors import ConfigError
from sandlab.grading import GradeItem, GradingPool
from sandlab.inference.base import ChatBackend, sampling_from
from sandlab.records import Record, read_jsonl

_RATING = re.compile(r"rating\s*[:=]\s*\**\s*(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_rating(text: str) -> float | None:
    """The last "Rating: X" in ``text``, snapped to the 0.5 grid; None if absent or outside 1-10."""
    matches = _RATING.findall(text)
    if not matches:
        return None
    value = round(float(matches[-1]) * 2) / 2
    return value if 1.0 <= value <= 10.0 else None


def _in_window(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def rate_difficulty(backend: ChatBackend, records: list[Record], cfg: DifficultyStage, root: Path, *, seed_offset: int = 0) -> tuple[list[Record], list[Record]]:
    template = load_prompt(root / cfg.prompt, "data.difficulty.prompt", problem="")
    sampling = sampling_from(cfg.sampling, n=cfg.ratings, offset=seed_offset)
    outputs = backend.generate([[{"role": "user", "content": template.format(problem=r["problem"])}] for r in records], sampling, desc="rate difficulty")
    kept, dropped = [], []
    for rec, completions in zip(records, outputs):
        ratings = [r for r in (parse_rating(c.text) for c in completions if c.ok) if r is not None]
        if not ratings:
            dropped.append({**rec, "reason": "unrated"})
            continue
        rated = {**rec, "difficulty": statistics.fmean(ratings), "difficulty_ratings": ratings}
        if _in_window(rated["difficulty"], cfg.min_difficulty, cfg.max_difficulty):
            kept.append(rated)
        else:
            dropped.append({**rated, "reason": "difficulty_out_of_range"})
    return kept, dropped


def filter_by_pass_rate(
    student: ChatBackend, pool: GradingPool, records: list[Record], cfg: PassRateStage, root: Path, *, seed_offset: int = 0
) -> tuple[list[Record], list[Record]]:
    records = [r if r.get("answer") is not None else {**r, "answer": r.get("reference_answer")} for r in records]  # distilled/source problems
    open_ended = [r["id"] for r in records if r.get("answer") is None]
    if open_ended:
        raise ConfigError(f"the passrate stage grades answers, but {len(open_ended)} records (e.g. {open_ended[0]!r}) are open-ended tasks without one")
    template = load_prompt(root / cfg.prompt, "data.passrate.prompt", problem="")
    sampling = sampling_from(cfg.sampling, n=cfg.m, offset=seed_offset)
    outputs = student.generate([[{"role": "user", "content": template.format(problem=r["problem"])}] for r in records], sampling, desc=f"student x{cfg.m}")
    items = [GradeItem(response=c.text if c.ok else "", gold=str(rec["answer"]), kind=rec.get("answer_kind") or "math")
             for rec, comps in zip(records, outputs) for c in comps]
    grades = pool.grade_many(items, desc="grade student")
    kept, dropped = [], []
    for i, rec in enumerate(records):
        correct = [g.correct for g in grades[i * cfg.m : (i + 1) * cfg.m]]
        rate = sum(correct) / len(correct)
        low_ok = rate > cfg.min_pass_rate if cfg.strict else rate >= cfg.min_pass_rate
        high_ok = rate < cfg.max_pass_rate if cfg.strict else rate <= cfg.max_pass_rate
        out = {**rec, "pass_rate": rate}
        if low_ok and high_ok:
            kept.append(out)
        else:
            dropped.append({**out, "reason": "pass_rate_out_of_window"})
    return kept, dropped


def filter_novelty(records: list[Record], cfg: NoveltyStage, *, corpus_vectors: np.ndarray | None = None, vectors: np.ndarray | None = None) -> tuple[list[Record], list[Record]]:
    """``corpus_vectors``/``vectors``: precomputed normalized embeddings (benchmarks, huge corpora)."""
    corpus: list[str] = []
    for path in cfg.corpora:
        if not Path(path).is_file():
            raise ConfigError(f"data.novelty.corpora: {path} does not exist")
        corpus += [row["problem"] for row in read_jsonl(path) if "problem" in row]
    if (not corpus and corpus_vectors is None) or not records:
        return list(records), []
    if corpus_vectors is None:
        corpus_vectors = embed(corpus, model=cfg.embedding_model, batch_size=cfg.batch_size, cache=True)
    index = inner_product_index(corpus_vectors, ivf_min_records=cfg.ivf_min_records, nprobe=cfg.nprobe)
    queries = vectors if vectors is not None else embed([r["problem"] for r in records], model=cfg.embedding_model, batch_size=cfg.batch_size)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)
    kept, dropped = [], []
    for rec, score, idx in zip(records, scores[:, 0], ids[:, 0]):
        if score >= cfg.threshold:
            dropped.append({**rec, "reason": "not_novel", "similarity": round(float(score), 4), "nearest_corpus_index": int(idx)})
        else:
            kept.append(rec)
    return kept, dropped
