"""Pass-rate selection: a student model samples m answers per problem; items are kept by pass-rate
window (SAND keeps what the student fails; AM-Thinking keeps 0 < pass rate < 1 for RL)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sandlab.config import PassRateStage
from sandlab.data_gen.prompts import load_prompt
from sandlab.errors import ConfigError
from sandlab.grading import GradeItem, GradingPool
from sandlab.inference.base import ChatBackend, sampling_from
from sandlab.records import Record
from sandlab.stages import Kind, Stage, StageContext, always


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


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    from sandlab.inference import build_backend  # noqa: PLC0415

    missing = [r.get("id") for r in records if r.get("answer") is None and r.get("reference_answer") is None]
    if missing:
        raise ConfigError(f"stage passrate: {len(missing)} records (e.g. id={missing[0]!r}) have no answer or reference_answer; run the solve and filter stages first")
    student_cfg = ctx.cfg.data.passrate.student
    if student_cfg.model == "tuned":  # the SFT model of this recipe (AM-Thinking selects RL prompts with it)
        student_cfg = dataclasses.replace(student_cfg, model=ctx.sft_model())
    with build_backend(student_cfg) as student:
        return filter_by_pass_rate(student, ctx.pool, records, ctx.cfg.data.passrate, ctx.root, seed_offset=offset)


def preflight(ctx: StageContext) -> None:
    if ctx.cfg.data.passrate.student.model == "tuned" and "train" not in ctx.cfg.stages:
        ctx.sft_model()


STAGE = Stage(
    "passrate", Kind.DATA, run, config=("data.passrate",), needs_student=True, needs_gpu=always, preflight=preflight,
    input_fields=("id", "problem"), input_hint="every record needs a stable id and a problem",
    hint="widen data.passrate.min_pass_rate/max_pass_rate",
)
