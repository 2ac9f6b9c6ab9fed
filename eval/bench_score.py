"""Score-stage throughput on this machine: the reward-model scorer (the tiny random-init reward model,
transformers, batched vs one pair at a time) and the rubric judge (the embedded SmolLM2-135M in the
in-process vLLM engine, JSON enforced by structured outputs vs free text), each side by side in one
run, on the same (request, response) pairs: general requests with responses of about 150 words.

    python eval/bench_score.py [--pairs 64] [--judge-pairs 32] [--markdown]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import time
from pathlib import Path

from sandlab.config import JudgeSettings, RewardModelSettings, SamplingSettings
from sandlab.data_gen.score import judge_pairs
from sandlab.inference.reward_model import RewardModel

WORDS = ("the model should explain each step clearly and give a short example so the user can check the result "
         "before moving on to the next part of the task which asks for a plan a table and a summary").split()


def make_pairs(n: int, words: int = 150, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [(f"Request {i}: " + " ".join(rng.choices(WORDS, k=25)), " ".join(rng.choices(WORDS, k=words))) for i in range(n)]


def bench_reward_model(pairs: list[tuple[str, str]]) -> list[tuple[str, float]]:
    rows = []
    for batch in (1, 8):
        model = RewardModel(RewardModelSettings(model="embedded://tiny-random-reward", batch_size=batch, dtype="float32", max_length=1024))
        conversations = [([{"role": "user", "content": q}], r) for q, r in pairs]
        model.score(conversations[:4])  # warm up
        start = time.perf_counter()
        model.score(conversations)
        rows.append((f"tiny reward model (7M), transformers, batch {batch}", len(pairs) / (time.perf_counter() - start)))
    return rows


def bench_judge(pairs: list[tuple[str, str]]) -> list[tuple[str, float, str]]:
    from sandlab.config import BackendConfig  # noqa: PLC0415
    from sandlab.inference import build_backend  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    backend = build_backend(BackendConfig(backend="vllm", model="embedded://smollm2-135m-instruct", max_model_len=2048, enforce_eager=True))
    cfg = JudgeSettings(sampling=SamplingSettings(temperature=0.0, max_tokens=64))
    rows = []
    try:
        judge_pairs(backend, pairs[:2], cfg, root)  # warm up (and compile the grammar once)
        for label, structured in (("structured outputs (JSON schema)", True), ("free text, parsed", False)):
            start = time.perf_counter()
            results, _ = judge_pairs(backend, pairs, cfg, root, structured=structured)
            seconds = time.perf_counter() - start
            parsed = sum(r[0] is not None for r in results)
            rows.append((f"SmolLM2-135M judge, vLLM engine, {label}", len(pairs) / seconds, f"{parsed}/{len(pairs)} parse"))
    finally:
        backend.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64, help="pairs for the reward model")
    parser.add_argument("--judge-pairs", type=int, default=32, help="pairs for the judge")
    parser.add_argument("--markdown", action="store_true", help="print a docs/PERFORMANCE.md table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rm = bench_reward_model(make_pairs(args.pairs))
    judge = bench_judge(make_pairs(args.judge_pairs, seed=1))
    machine = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    if args.markdown:
        print(f"| scorer ({machine}) | pairs/s | notes |\n|---|---|---|")
        for label, rate in rm:
            print(f"| {label} | {rate:.1f} | ~190-token pairs |")
        for label, rate, note in judge:
            print(f"| {label} | {rate:.2f} | {note} |")
    else:
        for label, rate in rm:
            print(f"{label}: {rate:.1f} pairs/s")
        for label, rate, note in judge:
            print(f"{label}: {rate:.2f} pairs/s ({note})")


if __name__ == "__main__":
    main()
