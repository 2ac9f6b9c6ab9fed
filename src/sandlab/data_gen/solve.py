"""Independent solutions: the teacher solves each problem k times without seeing the reference.

Adaptive sampling (``data.solve.adaptive``): where the agreement that follows (``data.agreement``,
modes majority and reference, no LLM judge) can be read off part of a problem's solutions, they are
sampled in rounds and a problem whose drop is already certain gets no more. Solution ``j`` of the
problem at position ``p`` is always sampled with seed ``seed + p * k + j``, so a problem that can
still be kept ends up with exactly the k solutions one round of k gives it, and the kept set equals
the fixed-k one. Each finished round of a shard is saved (``data/solve.rounds/``), so an interrupted
shard resumes at its next round.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sandlab.config import AgreementStage, AnswerRule, RecipeConfig, SolveStage
from sandlab.data_gen.agreement import cannot_be_kept, decides_early
from sandlab.data_gen.prompts import load_prompt
from sandlab.grading import GradingPool, extract_answer
from sandlab.inference.base import ChatBackend, Completion, sampling_from
from sandlab.records import Record, write_json
from sandlab.stages import Kind, Stage, StageContext, always

ROUNDS_DIR = "solve.rounds"


def round_sizes(cfg: SolveStage) -> list[int]:
    """Solutions per round, summing to k: ``round_sizes`` cut at k (the rest as one last round), or
    doubling rounds 1, 1, 2, 4, ..."""
    sizes, total = [], 0
    planned = iter(cfg.round_sizes) if cfg.round_sizes is not None else None
    while total < cfg.k:
        size = next(planned, cfg.k - total) if planned is not None else max(1, total)
        sizes.append(min(int(size), cfg.k - total))
        total += sizes[-1]
    return sizes


def adaptive_in_effect(cfg: RecipeConfig) -> bool:
    """The pipeline's solve stage samples in rounds: asked for, followed by a filter whose verdicts the
    grader alone decides, and with more than one distinct sample per problem."""
    solve = cfg.data.solve
    return (solve.adaptive and solve.k > 1 and solve.sampling.temperature > 0 and "filter" in cfg.stages
            and decides_early(cfg.data.agreement))


def _solution(c: Completion, problem: Record) -> dict[str, Any]:
    return {
        "text": c.text,
        # multi: a solution that boxes several answers votes for their set, not its last box. Code has
        # no answer to read off: its tests decide (data.agreement.mode=tests).
        "answer": extract_answer(c.text, problem.get("answer_kind", "math"), AnswerRule.multi)
        if c.ok and not c.truncated and problem.get("answer_kind") != "code" else None,
        "finish_reason": c.finish_reason,
        "completion_tokens": c.completion_tokens,
    }


def _inputs_digest(problems: list[Record], k: int) -> str:
    return hashlib.sha1(json.dumps([k, *[(p["id"], p["problem"]) for p in problems]]).encode()).hexdigest()


def _load_rounds(path: Path | None, problems: list[Record], k: int) -> tuple[int, list[list[dict[str, Any]]], list[bool]] | None:
    if path is None or not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("inputs") != _inputs_digest(problems, k):
        return None  # another input or k: start the shard over
    return state["rounds_done"], state["solutions"], state["stopped"]


def solve_problems(
    backend: ChatBackend, problems: list[Record], cfg: SolveStage, root: Path, *, seed_offset: int = 0,
    agreement: AgreementStage | None = None, pool: GradingPool | None = None, rounds_file: Path | None = None,
) -> list[Record]:
    """Each problem with ``cfg.k`` solutions. With ``agreement`` and ``pool`` (adaptive sampling), in
    rounds: a problem ``cannot_be_kept`` says is hopeless is marked ``solve_stopped`` and keeps the
    solutions it has. ``seed_offset``: the position of ``problems[0]`` in the stage's whole input."""
    template = load_prompt(root / cfg.prompt, "data.solve.prompt", problem="")
    conversations = [[{"role": "user", "content": template.format(problem=p["problem"])}] for p in problems]
    k = cfg.k
    if cfg.sampling.temperature == 0:  # greedy: the k samples are one, repeated
        outputs = backend.generate(conversations, sampling_from(cfg.sampling, n=k, offset=seed_offset), desc=f"solve x{k}")
        return [{**p, "solutions": [_solution(c, p) for c in completions]} for p, completions in zip(problems, outputs)]
    adaptive = agreement is not None and pool is not None
    sizes = round_sizes(cfg) if adaptive else [k]
    base = cfg.sampling.seed
    one = sampling_from(cfg.sampling, n=1)
    state = _load_rounds(rounds_file, problems, k) if adaptive else None
    done, solutions, stopped = state if state else (0, [[] for _ in problems], [False] * len(problems))
    for r in range(done, len(sizes)):
        jobs = [(p, j) for p in range(len(problems)) if not stopped[p] for j in range(len(solutions[p]), len(solutions[p]) + sizes[r])]
        if not jobs:
            break
        seeds = [None if base is None else base + (seed_offset + p) * k + j for p, j in jobs]
        desc = f"solve x{k}" if len(sizes) == 1 else f"solve round {r + 1}/{len(sizes)} (x{sizes[r]})"
        outputs = backend.generate([conversations[p] for p, _ in jobs], one, desc=desc, seeds=seeds)
        for (p, _), (completion,) in zip(jobs, outputs):
            solutions[p].append(_solution(completion, problems[p]))
        if r + 1 < len(sizes):
            open_ = [p for p in range(len(problems)) if not stopped[p]]
            partial = [{**problems[p], "solutions": solutions[p]} for p in open_]
            for p, hopeless in zip(open_, cannot_be_kept(partial, k, agreement, pool, include_reference=cfg.include_reference)):
                stopped[p] = hopeless
            if rounds_file is not None:
                write_json(rounds_file, {"inputs": _inputs_digest(problems, k), "rounds_done": r + 1, "solutions": solutions, "stopped": stopped})
    solved = []
    for p, problem in enumerate(problems):
        extra = {"solve_stopped": True, "solutions_skipped": k - len(solutions[p])} if stopped[p] else {}
        solved.append({**problem, "solutions": solutions[p], **extra})
    return solved


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    cfg = ctx.cfg
    if not adaptive_in_effect(cfg):
        return solve_problems(ctx.teacher, records, cfg.data.solve, ctx.root, seed_offset=offset), []
    rounds_file = ctx.data_dir / ROUNDS_DIR / f"{offset:010d}.json"
    solved = solve_problems(ctx.teacher, records, cfg.data.solve, ctx.root, seed_offset=offset,
                            agreement=cfg.data.agreement, pool=ctx.pool, rounds_file=rounds_file)
    return solved, []


def solve_summary(cfg: RecipeConfig, records: list[Record]) -> dict[str, Any]:
    """What adaptive sampling saved: solutions drawn and skipped, and their teacher tokens."""
    k = cfg.data.solve.k
    drawn = sum(len(r["solutions"]) for r in records)
    tokens = sum(s.get("completion_tokens", 0) for r in records for s in r["solutions"])
    skipped = sum(r.get("solutions_skipped", 0) for r in records)
    return {
        "adaptive": adaptive_in_effect(cfg), "k": k, "round_sizes": round_sizes(cfg.data.solve) if adaptive_in_effect(cfg) else [k],
        "problems": len(records), "stopped_early": sum(bool(r.get("solve_stopped")) for r in records),
        "solutions_drawn": drawn, "solutions_skipped": skipped, "completion_tokens": tokens,
        # The skipped solutions' tokens, at the mean length of those drawn: what one round of k would have added.
        "completion_tokens_skipped_est": round(skipped * tokens / drawn) if drawn else 0,
    }


def write_outputs(ctx: StageContext, records: list[Record], _row: dict[str, Any]) -> None:
    write_json(ctx.data_dir / "solve.json", solve_summary(ctx.cfg, records))


def _config_keys(cfg: RecipeConfig) -> tuple[str, ...]:
    # Adaptive: the solutions drawn depend on what the filter keeps.
    agreement = ("data.agreement.mode", "data.agreement.min_agreement", "data.agreement.min_votes", "data.agreement.llm_judge")
    return ("teacher.model", "data.solve", *(agreement if adaptive_in_effect(cfg) else ()))


STAGE = Stage(
    "solve", Kind.DATA, run, per_record=True, partitionable=True, config=_config_keys, needs_teacher=always,
    write_outputs=write_outputs, input_fields=("id", "problem"), input_hint="every record needs a stable id and a problem",
    hint="check the teacher",
)
