"""The filter stage: keep problems whose independent solutions agree (``majority``), whose solution
matches the reference answer (``reference``), whose code passes its tests (``tests``), or the first
complete response (``single``, open-ended tasks). The agreement logic itself is in ``sandlab.data_gen.agreement``."""

from __future__ import annotations

from sandlab.data_gen.agreement import filter_by_agreement, filter_by_reference, filter_by_tests, keep_first_complete
from sandlab.records import Record
from sandlab.stages import Kind, Stage, StageContext, require_fields


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    agreement = ctx.cfg.data.agreement
    if agreement.mode == "single":
        return keep_first_complete(records)
    if agreement.mode == "reference":
        if agreement.keep_unreferenced:  # AM: items without a reference are checked by the score stage's reward model
            referenced = [r for r in records if r.get("reference_answer") not in (None, "")]
            kept, dropped = filter_by_reference(referenced, agreement, ctx.pool)
            open_kept, open_dropped = keep_first_complete([r for r in records if r.get("reference_answer") in (None, "")])
            order = {r["id"]: i for i, r in enumerate(records)}
            kept += [{**r, "unverified": True} for r in open_kept]
            return sorted(kept, key=lambda r: order[r["id"]]), sorted(dropped + open_dropped, key=lambda r: order[r["id"]])
        require_fields(records, "filter", ["reference_answer"], "data.agreement.mode=reference needs problems with reference answers "
                       "(or data.agreement.keep_unreferenced=true with the score stage to check the rest)")
        return filter_by_reference(records, agreement, ctx.pool)
    if agreement.mode == "tests":
        return filter_by_tests(records, agreement, ctx.code_verifier)
    judge = ctx.teacher if agreement.llm_judge else None
    return filter_by_agreement(records, agreement, ctx.pool, include_reference=ctx.cfg.data.solve.include_reference, judge=judge, root=ctx.root)


def preflight(ctx: StageContext) -> None:
    """mode=tests: the sandbox's canary runs before any teacher loads (one line if bubblewrap cannot be used)."""
    if ctx.cfg.data.agreement.mode == "tests":
        ctx.code_verifier  # noqa: B018 (built for its start-up check)


STAGE = Stage(
    "filter", Kind.DATA, run, per_record=True, partitionable=True, config=("data.agreement", "data.solve.include_reference",
                                                                       "verify.timeout_s", "verify.memory_mb", "verify.allow_unsandboxed"),
    needs_teacher=lambda cfg: cfg.data.agreement.llm_judge and cfg.data.agreement.mode == "majority", preflight=preflight,
    input_fields=("id", "problem", "solutions"), input_hint="run stage=solve on them first",
    hint="raise data.generate.num_problems (or data.solve.k), or loosen data.agreement (min_agreement, min_votes)",
)
