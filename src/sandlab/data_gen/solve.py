"""Independent solutions: the teacher solves each problem k times without seeing the reference."""

from __future__ import annotations

from pathlib import Path

from sandlab.config import AnswerRule, SolveStage
from sandlab.data_gen.prompts import load_prompt
from sandlab.grading import extract_answer
from sandlab.inference.base import ChatBackend, sampling_from
from sandlab.records import Record
from sandlab.stages import Kind, Stage, StageContext, always


def solve_problems(backend: ChatBackend, problems: list[Record], cfg: SolveStage, root: Path, *, seed_offset: int = 0) -> list[Record]:
    template = load_prompt(root / cfg.prompt, "data.solve.prompt", problem="")
    conversations = [[{"role": "user", "content": template.format(problem=p["problem"])}] for p in problems]
    sampling = sampling_from(cfg.sampling, n=cfg.k, offset=seed_offset)
    outputs = backend.generate(conversations, sampling, desc=f"solve x{cfg.k}")
    solved = []
    for problem, completions in zip(problems, outputs):
        solutions = [
            {
                "text": c.text,
                # multi: a solution that boxes several answers votes for their set, not its last box. Code has
                # no answer to read off: its tests decide (data.agreement.mode=tests).
                "answer": extract_answer(c.text, problem.get("answer_kind", "math"), AnswerRule.multi)
                if c.ok and not c.truncated and problem.get("answer_kind") != "code" else None,
                "finish_reason": c.finish_reason,
                "completion_tokens": c.completion_tokens,
            }
            for c in completions
        ]
        solved.append({**problem, "solutions": solutions})
    return solved


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    return solve_problems(ctx.teacher, records, ctx.cfg.data.solve, ctx.root, seed_offset=offset), []


STAGE = Stage(
    "solve", Kind.DATA, run, per_record=True, partitionable=True, config=("teacher.model", "data.solve"), needs_teacher=always,
    input_fields=("id", "problem"), input_hint="every record needs a stable id and a problem", hint="check the teacher",
)
