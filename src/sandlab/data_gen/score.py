"""The score stage: quality scores for responses and the selection by them (LuminaSFT's quality
assessment, AM-DeepSeek-R1-Distilled's reward-model check).

Scorers (``data.score.scorer``): ``judge``, the teacher rating each response on named criteria as a
JSON object that must match a schema (enforced by structured output where the backend can; outputs
that do not parse are counted and dropped with a reason, never fatal), or ``reward_model``, a
sequence-classification reward model (``sandlab.inference.reward_model``).

Selection, in this order: best-of-n (every complete response of a record is scored and the best
becomes its trace), a threshold, and the best ``top_fraction`` of each taxonomy leaf (this step
compares records, so it runs once over the whole input after the per-record shards).
``scope=unverified`` scores only the records that no reference answer or test checked.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from sandlab.config import JudgeSettings, Scorer, ScoreScope, ScoreStage
from sandlab.data_gen.diversity import record_leaf
from sandlab.data_gen.prompts import load_prompt
from sandlab.grading import strip_reasoning
from sandlab.inference.base import ChatBackend, request_seed, sampling_from
from sandlab.records import Record, write_json
from sandlab.stages import Kind, Stage, StageContext

_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")
_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def judge_schema(cfg: JudgeSettings) -> dict[str, Any]:
    """One integer rating per criterion, nothing else."""
    # An enum, not minimum/maximum: grammar engines (xgrammar) enforce enums exactly, not numeric bounds.
    rating = {"type": "integer", "enum": list(range(cfg.min_rating, cfg.max_rating + 1))}
    return {"type": "object", "properties": {c: dict(rating) for c in cfg.criteria}, "required": list(cfg.criteria), "additionalProperties": False}


def parse_judgement(text: str, schema: dict[str, Any]) -> tuple[dict[str, int] | None, str | None]:
    """(ratings, None) when ``text`` is a JSON object matching ``schema``, else (None, reason): a judge
    without enforced structured output may wrap its JSON in prose or a code fence."""
    import jsonschema  # noqa: PLC0415

    body = _FENCE.sub("", strip_reasoning(text).strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        found = _OBJECT.search(body)
        try:
            value = json.loads(found.group(0)) if found else None
        except json.JSONDecodeError:
            value = None
        if value is None:
            return None, "judge_not_json"
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return None, "judge_schema_mismatch"
    return value, None


def weighted_rating(ratings: dict[str, int], cfg: JudgeSettings) -> float:
    weights = {c: cfg.weights.get(c, 1.0) for c in cfg.criteria}
    return sum(ratings[c] * w for c, w in weights.items()) / sum(weights.values())


def _visible(text: str, include_reasoning: bool) -> str:
    return text if include_reasoning else strip_reasoning(text).strip()


def judge_pairs(backend: ChatBackend, pairs: list[tuple[str, str]], cfg: JudgeSettings, root: Path, *,
                seeds: list[int | None] | None = None, structured: bool = True) -> tuple[list[tuple[float | None, dict[str, int] | None, str | None]], list[bool]]:
    """Per (request, response): (score, ratings, None) or (None, None, reason), and whether the response
    was cut to ``max_response_chars`` (its front goes). Pair ``i`` is judged with ``seeds[i]`` (default:
    the judge's seed + i). ``structured=False`` sends no schema (benchmarks)."""
    fields = {"request": "", "response": "", "criteria": "", "min_rating": "", "max_rating": ""}
    template = load_prompt(root / cfg.prompt, "data.score.judge.prompt", **fields)
    criteria = "\n".join(f"- {c}: {cfg.descriptions[c]}" if c in cfg.descriptions else f"- {c}" for c in cfg.criteria)
    schema = judge_schema(cfg)
    cut = [len(response) > cfg.max_response_chars for _, response in pairs]
    conversations = [[{"role": "user", "content": template.format(
        request=request, response=response[-cfg.max_response_chars:], criteria=criteria, min_rating=cfg.min_rating, max_rating=cfg.max_rating,
    )}] for request, response in pairs]
    sampling = replace(sampling_from(cfg.sampling, n=1), json_schema=schema if structured else None)
    results = []
    for [completion] in backend.generate(conversations, sampling, desc="judge", seeds=seeds):
        if not completion.ok:
            results.append((None, None, "judge_failed"))
        elif completion.truncated:
            results.append((None, None, "judge_truncated"))
        else:
            ratings, reason = parse_judgement(completion.text, schema)
            results.append((weighted_rating(ratings, cfg), ratings, None) if ratings else (None, None, reason))
    return results, cut


def _candidates(rec: Record, best_of_n: bool) -> list[str]:
    if not best_of_n and rec.get("solution"):
        return [rec["solution"]]
    return [s["text"] for s in rec.get("solutions", ()) if s.get("finish_reason") == "stop" and strip_reasoning(s.get("text", "")).strip()]


def score_records(ctx: StageContext, records: list[Record], offset: int = 0) -> tuple[list[Record], list[Record]]:
    cfg = ctx.cfg.data.score
    in_scope = [cfg.scope == ScoreScope.all or bool(r.get("unverified")) for r in records]
    kept: list[Record] = []
    dropped: list[Record] = []
    plans = [(at, rec, _candidates(rec, cfg.best_of_n)) for at, (rec, scoped) in enumerate(zip(records, in_scope)) if scoped]
    pairs = [(rec["problem"], _visible(text, cfg.include_reasoning)) for _, rec, texts in plans for text in texts]
    scored_by = f"judge:{ctx.cfg.teacher.model}" if cfg.scorer == Scorer.judge else f"reward_model:{cfg.reward_model.model}"
    if not pairs:  # nothing to score in this shard: no model loads
        results, cut = [], []
    elif cfg.scorer == Scorer.judge:
        k = max(1, ctx.cfg.data.solve.k)
        # Candidate j of the record at position p of the whole input is judged with seed + p * k + j, however the
        # input is sharded (deterministic anyway at the default temperature 0; a record with more than k candidates
        # shares seeds with the next record's, on other conversations).
        seeds = [request_seed(cfg.judge.sampling, (offset + at) * k + j) for at, _, texts in plans for j in range(len(texts))]
        results, cut = judge_pairs(ctx.teacher, pairs, cfg.judge, ctx.root, seeds=seeds)
    else:
        rewards = ctx.reward_model.score([([{"role": "user", "content": request}], response) for request, response in pairs])
        results, cut = [(s, None, None) for s in rewards.scores], rewards.truncated
    at = 0
    for _, rec, texts in plans:
        span = slice(at, at + len(texts))
        at = span.stop
        mine, n_cut = results[span], sum(cut[span])
        failures = Counter(reason for _, _, reason in mine if reason)
        base = {**rec, "scored_by": scored_by, "candidate_scores": [s for s, _, _ in mine], **({"score_failures": dict(failures)} if failures else {}),
                **({"score_inputs_cut": n_cut} if n_cut else {})}
        if not texts:
            dropped.append({**base, "reason": "no_complete_response"})
            continue
        scored = [(s, ratings, text) for (s, ratings, _), text in zip(mine, texts) if s is not None]
        if not scored:
            dropped.append({**base, "reason": failures.most_common(1)[0][0]})
            continue
        best, ratings, text = max(scored, key=lambda t: t[0])  # first of equal scores: stable
        rated = {**base, "score": best, "solution": text, **({"score_details": ratings} if ratings else {})}
        if cfg.threshold is not None and best < cfg.threshold:
            dropped.append({**rated, "reason": "below_threshold"})
        else:
            kept.append(rated)
    rated_by_id = {r["id"]: r for r in kept}  # records out of scope (verified otherwise) pass unscored, in input order
    return [rated_by_id.get(r["id"], r) for r, scoped in zip(records, in_scope) if not scoped or r["id"] in rated_by_id], dropped


def select_top_fraction(ctx: StageContext, kept: list[Record], dropped: list[Record]) -> tuple[list[Record], list[Record]]:
    """After all shards: the best ``top_fraction`` of each taxonomy leaf (at least one record each;
    unscored records pass), then data/score.json with what was scored and dropped."""
    cfg = ctx.cfg.data.score
    if cfg.top_fraction is not None:
        by_leaf: dict[str | None, list[int]] = defaultdict(list)
        for i, rec in enumerate(kept):
            if rec.get("score") is not None:
                by_leaf[record_leaf(rec)].append(i)
        out: set[int] = set()
        for members in by_leaf.values():
            quota = max(1, math.ceil(cfg.top_fraction * len(members)))
            out.update(sorted(members, key=lambda i: -kept[i]["score"])[quota:])
        dropped = dropped + [{**kept[i], "reason": "below_top_fraction"} for i in sorted(out)]
        kept = [rec for i, rec in enumerate(kept) if i not in out]
    write_json(ctx.data_dir / "score.json", score_summary(cfg, kept, dropped))
    return kept, dropped


def score_summary(cfg: ScoreStage, kept: list[Record], dropped: list[Record]) -> dict[str, Any]:
    """What report.md and W&B show about the scores: counts, failures, and the kept scores by leaf."""
    everything = kept + dropped
    failures: Counter[str] = Counter()
    for rec in everything:
        failures.update(rec.get("score_failures") or {})
    scores = [r["score"] for r in kept if r.get("score") is not None]
    by_leaf: dict[str, list[float]] = defaultdict(list)
    for rec in kept:
        if rec.get("score") is not None:
            by_leaf[record_leaf(rec) or "(no leaf)"].append(rec["score"])
    return {
        "scorer": str(cfg.scorer),
        "model": cfg.reward_model.model if cfg.scorer == Scorer.reward_model else None,
        "records_scored": sum(1 for r in everything if "scored_by" in r),
        "candidates_scored": sum(len(r.get("candidate_scores") or ()) for r in everything),
        "failed_judgements": dict(failures),
        "inputs_cut": sum(r.get("score_inputs_cut", 0) for r in everything),
        "kept": len(kept),
        "score_mean": statistics.fmean(scores) if scores else None,
        "score_quartiles": statistics.quantiles(scores, n=4) if len(scores) > 1 else scores,
        "by_leaf": {leaf: {"records": len(v), "score_mean": statistics.fmean(v)} for leaf, v in sorted(by_leaf.items())},
    }


def preflight(ctx: StageContext) -> None:
    """Before any teacher or student loads: the reward model has a one-output classification head
    (read from its config), or the judge prompt formats."""
    cfg = ctx.cfg.data.score
    if cfg.scorer == Scorer.reward_model:
        from sandlab.inference.reward_model import check_reward_model  # noqa: PLC0415

        check_reward_model(cfg.reward_model.model)
    else:
        load_prompt(ctx.root / cfg.judge.prompt, "data.score.judge.prompt", request="", response="", criteria="", min_rating="", max_rating="")


STAGE = Stage(
    "score", Kind.DATA, score_records, per_record=True, finish=select_top_fraction, preflight=preflight,
    config=("data.score", "teacher.model", "data.solve.k"),
    needs_teacher=lambda cfg: cfg.data.score.scorer == Scorer.judge,
    needs_gpu=lambda cfg: cfg.data.score.scorer == Scorer.reward_model,
    input_fields=("id", "problem"), input_hint="run the solve and filter stages on them first",
    hint="lower data.score.threshold or raise data.score.top_fraction (or data.solve.k for more candidates)",
)
