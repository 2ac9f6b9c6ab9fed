"""Difficulty rating: a judge model rates each problem 1-10 in 0.5 steps, several times, averaged;
problems outside a configured window are dropped."""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from sandlab.config import DifficultyStage
from sandlab.data_gen.prompts import load_prompt
from sandlab.inference.base import ChatBackend, sampling_from
from sandlab.records import Record
from sandlab.stages import Kind, Stage, StageContext, always

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


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    return rate_difficulty(ctx.teacher, records, ctx.cfg.data.difficulty, ctx.root, seed_offset=offset)


STAGE = Stage(
    "difficulty", Kind.DATA, run, per_record=True, partitionable=True, config=("teacher.model", "data.difficulty"), needs_teacher=always,
    input_fields=("id", "problem"), input_hint="every record needs a stable id and a problem",
    hint="widen data.difficulty.min_difficulty/max_difficulty",
)
