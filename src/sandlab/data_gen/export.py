"""SFT export: prompt/completion conversations with the full reasoning trace and the final answer."""

from __future__ import annotations

from sandlab.config import ExportStage
from sandlab.grading import last_boxed
from sandlab.records import Record


def to_sft_example(rec: Record, cfg: ExportStage) -> Record:
    solution = rec["solution"].strip()
    # The trace must end in the target answer format; open-ended tasks (answer None) have none.
    if rec.get("answer") is not None and last_boxed(solution) is None:
        solution += f"\n\nThe final answer is \\boxed{{{rec['answer']}}}."
    prompt = []
    if cfg.system_prompt:
        prompt.append({"role": "system", "content": cfg.system_prompt})
    prompt.append({"role": "user", "content": rec["problem"]})
    return {
        "id": rec["id"],
        "variant": rec.get("variant") or cfg.variant,
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": solution}],
        "answer": rec.get("answer"),
        "source": {k: rec.get(k) for k in ("domain", "branch", "topic", "secondary_branch", "task", "answer_kind", "teacher", "agreement")},
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
