"""SFT export: prompt/completion conversations with the full reasoning trace and the final answer,
written as sft/train.jsonl, one file per variant and a dataset card."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sandlab.config import ExportStage
from sandlab.grading import last_boxed
from sandlab.records import Record, write_jsonl
from sandlab.stages import Kind, Stage, StageContext, data_stage_names


def to_sft_example(rec: Record, cfg: ExportStage) -> Record:
    solution = rec["solution"].strip()
    # The trace must end in the target answer format; open-ended tasks and code (answer None) have none.
    code = rec.get("answer_kind") == "code"
    if rec.get("answer") is not None and not code and last_boxed(solution) is None:
        solution += f"\n\nThe final answer is \\boxed{{{rec['answer']}}}."
    prompt = []
    if cfg.system_prompt:
        prompt.append({"role": "system", "content": cfg.system_prompt})
    prompt.append({"role": "user", "content": rec["problem"]})
    return {
        "id": rec["id"],
        "variant": rec.get("variant") or ("code" if code else cfg.variant),
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": solution}],
        "answer": rec.get("answer"),
        "source": {k: rec.get(k) for k in ("domain", "branch", "topic", "secondary_branch", "task", "answer_kind", "teacher", "agreement")},
        # Code rows keep their tests, so the export also serves as GRPO prompts (the code reward runs them).
        **({"answer_kind": "code", "tests": rec["tests"], "fn_name": rec.get("fn_name")} if code and rec.get("tests") else {}),
    }


def export_sft(records: list[Record], cfg: ExportStage) -> tuple[list[Record], list[Record]]:
    kept, dropped = [], []
    for rec in records:
        words = len(rec["solution"].split())
        if words < cfg.min_words:
            dropped.append({**rec, "reason": "too_short", "words": words})
            continue
        kept.append(to_sft_example(rec, cfg))
    return kept, dropped


def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    return export_sft(records, ctx.cfg.data.export)


def write_sft(ctx: StageContext, rows: list[Record], export_row: dict[str, Any]) -> None:
    """sft/train.jsonl (all variants), sft/<variant>/train.jsonl and a dataset card, sft/README.md."""
    from sandlab.reporting import dataset_card  # noqa: PLC0415
    from sandlab.runs import git_sha  # noqa: PLC0415

    if not rows:
        return
    sft = ctx.run.sub("sft")
    write_jsonl(sft / "train.jsonl", rows)
    by_variant: dict[str, list[Record]] = defaultdict(list)
    for row in rows:
        by_variant[row.get("variant") or "default"].append(row)
    for variant, subset in by_variant.items():
        write_jsonl(ctx.run.sub("sft", variant) / "train.jsonl", subset)
    d, cfg = ctx.cfg.data, ctx.cfg
    settings = {
        "generate": {"style": d.generate.style, "taxonomy": d.generate.taxonomy, "source": d.generate.source, "requested": d.generate.num_problems},
        "solve": {"k": d.solve.k, "include_reference": d.solve.include_reference, "temperature": d.solve.sampling.temperature},
        "agreement": {"mode": d.agreement.mode, "min_agreement": d.agreement.min_agreement, "min_votes": d.agreement.min_votes, "llm_judge": d.agreement.llm_judge},
        "dedup": {"embedding_model": d.dedup.embedding_model, "threshold": d.dedup.threshold, "minhash_threshold": d.dedup.minhash_threshold},
        "decontam": {"benchmarks": d.decontam.benchmarks, "ngram_n": d.decontam.ngram_n, "embedding_threshold": d.decontam.embedding_threshold},
        "export": {"min_words": d.export.min_words},
    }
    stages = [s for s in cfg.stages if s in data_stage_names()]
    settings = {k: v for k, v in settings.items() if {"agreement": "filter"}.get(k, k) in stages} | {"stages": stages}
    card = dataset_card(rows, [*ctx.funnel(), export_row], name=d.name, recipe=cfg.recipe, teacher=cfg.teacher.model, git_sha=git_sha(), settings=settings)
    (sft / "README.md").write_text(card)


STAGE = Stage(
    "export", Kind.DATA, run, per_record=True, config=("data.export",), write_outputs=write_sft,
    input_fields=("id", "problem", "solution", "answer"), input_hint="run the solve and filter stages first",
    hint="lower data.export.min_words",
)
