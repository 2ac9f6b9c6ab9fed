"""The project's own evaluation harness: benchmark prompts -> backend -> shared grader -> metrics."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from sandlab.benchmarks import load_benchmark
from sandlab.config import EvalConfig, SamplingSettings
from sandlab.grading import GradeItem, GradingPool
from sandlab.inference.base import ChatBackend, SamplingConfig
from sandlab.records import read_jsonl, write_json, write_jsonl

LETTERS = "ABCD"


def render_prompt(item: dict[str, Any], system_prompt: str) -> list[dict[str, str]]:
    content = item["problem"]
    if item["kind"] == "mcq":
        options = "\n".join(f"{LETTERS[i]}) {opt}" for i, opt in enumerate(item["options"]))
        content = f"{content}\n\n{options}\n\nAnswer with the letter of the correct option."
    conv = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return conv + [{"role": "user", "content": content}]


def gold_of(item: dict[str, Any]) -> str:
    return LETTERS[item["answer"]] if item["kind"] == "mcq" else item["answer"]


def sampling_for(cfg: EvalConfig, benchmark: str) -> SamplingSettings:
    return cfg.sampling.get(benchmark) or cfg.sampling.get("default") or SamplingSettings()


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    by_item: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_item.setdefault(s["item_id"], []).append(s)
    per_item = [statistics.fmean(float(s["correct"]) for s in group) for group in by_item.values()]
    return {
        "items": len(by_item),
        "samples": len(samples),
        "pass@1": 100.0 * statistics.fmean(per_item) if per_item else 0.0,
        "mean_output_tokens": statistics.fmean(s["completion_tokens"] for s in samples) if samples else 0.0,
        "truncated_share": statistics.fmean(s["finish_reason"] == "length" for s in samples) if samples else 0.0,
        "no_answer_share": statistics.fmean(s["pred"] is None for s in samples) if samples else 0.0,
    }


def evaluate_benchmark(backend: ChatBackend, pool: GradingPool, benchmark: str, cfg: EvalConfig, out_dir: Path) -> dict[str, Any]:
    """Generate, grade and save every sample of one benchmark; a finished benchmark is not redone."""
    samples_path, metrics_path = out_dir / "samples.jsonl", out_dir / "metrics.json"
    if samples_path.exists() and metrics_path.exists():
        return summarize(read_jsonl(samples_path))
    items = load_benchmark(benchmark, limit=cfg.limit)
    settings = sampling_for(cfg, benchmark)
    conversations = [render_prompt(item, cfg.system_prompt) for item in items]
    outputs = backend.generate(conversations, SamplingConfig(**vars(settings)), desc=f"eval {benchmark}")
    flat = [(item, conv, k, c) for item, conv, comps in zip(items, conversations, outputs) for k, c in enumerate(comps)]
    grades = pool.grade_many([GradeItem(response=c.text if c.ok else "", gold=gold_of(item), kind=item["kind"]) for item, _, _, c in flat], desc=f"grade {benchmark}")
    samples = [
        {
            "item_id": item["id"], "sample": k, "benchmark": benchmark, "prompt": conv, "output": c.text,
            "pred": g.pred, "gold": gold_of(item), "correct": g.correct, "finish_reason": c.finish_reason,
            "completion_tokens": c.completion_tokens,
        }
        for (item, conv, k, c), g in zip(flat, grades)
    ]
    write_jsonl(samples_path, samples)
    metrics = summarize(samples)
    write_json(metrics_path, metrics)
    return metrics
