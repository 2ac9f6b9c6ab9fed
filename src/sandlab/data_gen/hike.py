"""Difficulty hiking (SAND-Math): rewrite moderate problems into harder ones by injecting a theorem
from a branch -> topic -> theorem taxonomy and a concept from another branch; the hiked problems are
then solved again and filtered like freshly generated ones."""

from __future__ import annotations

import random
from pathlib import Path

from sandlab.config import AgreementStage, HikeStage, SolveStage
from sandlab.data_gen.agreement import decides_early, filter_by_agreement
from sandlab.data_gen.generate import parse_problem
from sandlab.data_gen.prompts import load_prompt
from sandlab.data_gen.solve import solve_problems
from sandlab.data_gen.taxonomy import Taxonomy
from sandlab.errors import ConfigError
from sandlab.grading import GradingPool
from sandlab.inference.base import ChatBackend, sampling_from
from sandlab.records import Record, stable_id
from sandlab.stages import Kind, Stage, StageContext, always


def hike_problems(
    backend: ChatBackend, pool: GradingPool, records: list[Record], cfg: HikeStage, solve: SolveStage, agreement: AgreementStage,
    root: Path, *, seed: int, teacher: str,
) -> tuple[list[Record], list[Record]]:
    """Returns (originals + verified hiked problems, failed hikes with reasons)."""
    taxonomy = Taxonomy.load(root / cfg.taxonomy, what="data.hike.taxonomy").branches  # branch -> topic -> theorems
    template = load_prompt(root / cfg.prompt, "data.hike.prompt", problem="", theorem="", branch="", topic="", secondary="")
    moderate = [r for r in records if isinstance(r.get("difficulty"), (int, float)) and cfg.min_difficulty <= r["difficulty"] <= cfg.max_difficulty]
    if not moderate:
        return list(records), []
    requests = []
    for rec in moderate:
        rng = random.Random(f"{seed}:{rec['id']}")  # the same problem draws the same theorem on a rerun
        branch = rec.get("branch") if rec.get("branch") in taxonomy else rng.choice(sorted(taxonomy))
        topic = rng.choice(sorted(taxonomy[branch]))
        theorems = taxonomy[branch][topic][1]
        if not theorems:
            raise ConfigError(f"data.hike.taxonomy: {branch}/{topic} lists no theorems")
        theorem = rng.choice(theorems)
        secondary = rng.choice([b for b in sorted(taxonomy) if b != branch])
        prompt = template.format(problem=rec["problem"], theorem=theorem, branch=branch, topic=topic, secondary=secondary)
        requests.append((rec, {"theorem": theorem, "topic": topic, "secondary_branch": secondary}, prompt))
    sampling = sampling_from(cfg.sampling, n=1)
    outputs = backend.generate([[{"role": "user", "content": p}] for _, _, p in requests], sampling, desc="hike problems")
    hiked, failed = [], []
    for (rec, injected, _), (completion,) in zip(requests, outputs):
        base = {"id": stable_id("hiked", rec["id"]), "hiked_from": rec["id"], "branch": rec.get("branch"), **injected, "variant": "hiked"}
        if not completion.ok or completion.truncated:
            failed.append({**base, "reason": "teacher_error" if not completion.ok else "truncated"})
            continue
        fields, reason = parse_problem(completion.text, reference_solution=True)
        if fields is None:
            failed.append({**base, "reason": reason, "raw": completion.text[:2000]})
            continue
        hiked.append({**base, **fields, "teacher": teacher})
    verified: list[Record] = []
    if hiked:
        adaptive = solve.adaptive and decides_early(agreement)
        solved = solve_problems(backend, hiked, solve, root, agreement=agreement if adaptive else None, pool=pool)
        verified, disagreed = filter_by_agreement(solved, agreement, pool, include_reference=solve.include_reference, judge=backend, root=root)
        failed += [{**d, "reason": f"hiked_{d['reason']}"} for d in disagreed]
    return list(records) + verified, failed


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    d = ctx.cfg.data
    return hike_problems(ctx.teacher, ctx.pool, records, d.hike, d.solve, d.agreement, ctx.root, seed=ctx.cfg.run.seed, teacher=ctx.cfg.teacher.model)


STAGE = Stage("hike", Kind.DATA, run, config=("teacher.model", "data.hike"), needs_teacher=always, input_fields=("id", "problem"),
              input_hint="every record needs a stable id and a problem", hint="check the teacher")
