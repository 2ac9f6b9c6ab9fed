"""The project's own evaluation harness: benchmark prompts -> backend -> shared grader -> metrics.

Generation runs in chunks of ``eval.chunk_size`` items; each finished chunk of samples is saved
atomically, so a killed evaluation resumes at the first unfinished chunk, and sampling seeds follow
each item's position, so the resumed samples equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from sandlab.benchmarks import humaneval_program, load_benchmark
from sandlab.config import EvalConfig, SamplingSettings
from sandlab.eval.metrics import summarize
from sandlab.grading import GradeItem, GradingPool
from sandlab.inference.base import ChatBackend, sampling_from
from sandlab.records import map_shards, read_jsonl, write_json, write_jsonl

LETTERS = "ABCD"


def arrange_options(item: dict[str, Any], order: str, seed: int = 0) -> tuple[list[str], int]:
    """Multiple-choice options in the protocol's order and the index of the correct one.

    ``as_is``: as the benchmark file lists them; ``correct_first``: the correct option is A (AMD's
    GPQA file, the paper protocol); ``shuffled``: a fixed permutation per question (seed + item id).
    """
    options, answer = list(item["options"]), int(item["answer"])
    if order == "as_is":
        return options, answer
    if order == "correct_first":
        return [options[answer]] + [o for i, o in enumerate(options) if i != answer], 0
    if order == "shuffled":
        perm = list(range(len(options)))
        random.Random(f"{seed}:{item['id']}").shuffle(perm)
        return [options[i] for i in perm], perm.index(answer)
    raise ValueError(f"unknown option order {order!r}; use as_is, correct_first or shuffled")


def render_prompt(item: dict[str, Any], system_prompt: str, option_order: str = "as_is", option_seed: int = 0) -> list[dict[str, str]]:
    content = item["problem"]
    if item["kind"] == "mcq":
        options, _ = arrange_options(item, option_order, option_seed)
        listed = "\n".join(f"{LETTERS[i]}) {opt}" for i, opt in enumerate(options))
        content = f"{content}\n\n{listed}\n\nAnswer with the letter of the correct option."
    # Code problems state their own answer format (a ```python block); the math instruction would contradict it.
    conv = [{"role": "system", "content": system_prompt}] if system_prompt and item["kind"] != "code" else []
    return conv + [{"role": "user", "content": content}]


def gold_of(item: dict[str, Any], option_order: str = "as_is", option_seed: int = 0) -> str:
    return LETTERS[arrange_options(item, option_order, option_seed)[1]] if item["kind"] == "mcq" else item["answer"]


def sampling_for(cfg: EvalConfig, benchmark: str) -> SamplingSettings:
    return cfg.sampling.get(benchmark) or cfg.sampling.get("default") or SamplingSettings()


def _verify_chunk(verifier: Any, flat: list[tuple[Any, ...]], benchmark: str) -> list[dict[str, Any]]:
    """Code items: each sample's last ```python block run against the item's tests in the sandbox;
    ``correct`` is None for a sandbox failure (left out of pass@1 and counted as ``infra_errors``)."""
    from sandlab.verification import CodeItem, TestCase, extract_code  # noqa: PLC0415

    def program(item: dict[str, Any], text: str) -> str:
        code = extract_code(text)
        if code is None or item["benchmark"] != "humaneval":
            return text
        return humaneval_program(item, code)

    items = [CodeItem(program(item, c.text if c.ok else ""), tuple(TestCase(**t) for t in item["tests"]), item.get("fn_name"))
             for item, _, _, _, c in flat]
    results = verifier.verify_many(items, desc=f"verify {benchmark}")
    return [
        {
            "item_id": item["id"], "sample": k, "benchmark": benchmark, "prompt": conv, "output": c.text, "pred": None, "gold": None,
            "correct": None if r.infra_error else r.passed, "statuses": r.statuses, "pass_frac": r.pass_frac,
            "difficulty": item.get("difficulty"), "platform": item.get("platform"), "finish_reason": c.finish_reason,
            "completion_tokens": c.completion_tokens,
        }
        for (item, _, conv, k, c), r in zip(flat, results)
    ]


def _generate_chunk(backend: ChatBackend, pool: GradingPool, items: list[dict[str, Any]], start: int, benchmark: str, cfg: EvalConfig,
                    verifier: Any = None) -> list[dict[str, Any]]:
    settings = sampling_for(cfg, benchmark)
    conversations = [render_prompt(item, cfg.system_prompt, cfg.option_order, cfg.option_seed) for item in items]
    golds = [gold_of(item, cfg.option_order, cfg.option_seed) for item in items]
    outputs = backend.generate(conversations, sampling_from(settings, n=settings.n, offset=start), desc=f"eval {benchmark} [{start}:{start + len(items)}]")
    flat = [(item, gold, conv, k, c) for item, gold, conv, comps in zip(items, golds, conversations, outputs) for k, c in enumerate(comps)]
    if items and items[0]["kind"] == "code":
        if verifier is None:
            raise ValueError(f"{benchmark} is a code benchmark: evaluate_benchmark needs a verifier")
        return _verify_chunk(verifier, flat, benchmark)
    grades = pool.grade_many([GradeItem(response=c.text if c.ok else "", gold=gold, kind=item["kind"], rule=cfg.answer_rule)
                              for item, gold, _, _, c in flat], desc=f"grade {benchmark}")
    return [
        {
            "item_id": item["id"], "sample": k, "benchmark": benchmark, "prompt": conv, "output": c.text,
            "pred": g.pred, "gold": gold, "correct": g.correct, "finish_reason": c.finish_reason,
            "completion_tokens": c.completion_tokens,
        }
        for (item, gold, conv, k, c), g in zip(flat, grades)
    ]


def evaluate_benchmark(backend: ChatBackend, pool: GradingPool, benchmark: str, cfg: EvalConfig, out_dir: Path, verifier: Any = None) -> dict[str, Any]:
    """Generate, grade (math, mcq) or verify (code, with ``verifier``: a CodeVerifier) and save every
    sample of one benchmark; finished chunks are not redone."""
    samples_path, metrics_path = out_dir / "samples.jsonl", out_dir / "metrics.json"
    if samples_path.exists() and metrics_path.exists():
        return json.loads(metrics_path.read_text())
    items = load_benchmark(benchmark, limit=cfg.limit, livecodebench=cfg.livecodebench)
    size = max(1, cfg.chunk_size)
    chunks = out_dir / f"samples.chunks-{size}"
    done = map_shards(lambda chunk, start: _generate_chunk(backend, pool, chunk, start, benchmark, cfg, verifier), items, size, chunks,
                      save=write_jsonl, load=read_jsonl, suffix=".jsonl")
    samples = [sample for chunk in done for sample in chunk]
    write_jsonl(samples_path, samples)
    metrics = {"protocol": cfg.protocol, "answer_rule": str(cfg.answer_rule), **summarize(samples, seed=cfg.option_seed)}
    if items and items[0]["kind"] == "code":
        metrics["sandboxed"] = bool(getattr(verifier, "sandboxed", True))
    write_json(metrics_path, metrics)
    shutil.rmtree(chunks, ignore_errors=True)
    return metrics
