"""Throughput benchmark for the shared grader (``sandlab.grading.GradingPool``) on MATH500 answers.

For every MATH500 item it builds MATH500-style responses with known labels:
  * correct:      "... so the answer is \\boxed{<gold>}"                    -> should grade correct
  * reformatted:  an equivalent rewrite of the gold (\\dfrac, a/b, N.0, spacing), where cheap -> correct
  * wrong:        another item's (textually different) answer               -> should grade incorrect
and grades them all with pools of 1 and 2 workers, reporting items/s and agreement with the labels.

    python eval/bench_grading.py [--data PATH] [--workers 1,2] [--timeout 5] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The Makefile exports SANDLAB_BENCHMARK_DIR; otherwise ../shared beside the checkout.
DEFAULT_DATA = Path(os.environ.get("SANDLAB_BENCHMARK_DIR", REPO.parent / "shared/benchmarks")) / "math500.jsonl"

try:
    import sandlab.grading  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO / "src"))

from sandlab.grading import GradeItem, GradeResult, GradingPool, math_equal  # noqa: E402
from sandlab.grading.math_equiv import fast_equal  # noqa: E402
from sandlab.grading.pool import decide_cheaply  # noqa: E402

TEMPLATE = "Let me work through the problem step by step.\n\n[...]\n\nSo the answer is \\boxed{{{}}}."


def reformat(answer: str) -> str | None:
    """An equivalent but textually different form of ``answer``, or None when none is cheap to make."""
    if re.fullmatch(r"-?\d+", answer):
        return f"{answer}.0"
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", answer)
    if m:
        return f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    new = re.sub(r"\\frac(?![A-Za-z])", r"\\dfrac", answer)
    new = re.sub(r",\s*", ", ", new)
    if new != answer:
        return new
    return None


def build(rows: list[dict]) -> tuple[list[GradeItem], list[bool], list[str]]:
    """Responses, expected verdicts and categories for the MATH500 rows."""
    items: list[GradeItem] = []
    labels: list[bool] = []
    cats: list[str] = []
    n = len(rows)
    for i, row in enumerate(rows):
        gold = row["answer"]
        items.append(GradeItem(TEMPLATE.format(gold), gold))
        labels.append(True)
        cats.append("correct")
        ref = reformat(gold)
        if ref is not None:
            items.append(GradeItem(TEMPLATE.format(ref), gold))
            labels.append(True)
            cats.append("reformatted")
        # Wrong: the next item whose answer differs textually (many MATH500 answers are small ints;
        # "x=5" counts as the same answer as "5").
        for j in range(1, n):
            other = rows[(i + j) % n]["answer"]
            if not (fast_equal(gold, other) or fast_equal(other, gold)):
                break
        items.append(GradeItem(TEMPLATE.format(other), gold))
        labels.append(False)
        cats.append("wrong")
    return items, labels, cats


def _time_in_process(items: list[GradeItem]) -> tuple[float, list[GradeResult]]:
    """Grade ``items`` serially in this process; meant to run in a fresh (cold-cache) process."""
    math_equal("\\frac{1}{2}", "0.5")  # same warm-up as a pool worker: imports, parser set-up
    start = time.perf_counter()
    results = [_grade_in_process(item) for item in items]
    return time.perf_counter() - start, results


def _grade_in_process(item: GradeItem) -> GradeResult:
    """Same decision as the pool, but math-verify runs here, on the main thread (signal timeouts only)."""
    decided, pred = decide_cheaply(item)
    if decided is not None:
        return decided
    return GradeResult(pred, math_equal(item.gold, pred), "math_verify")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"MATH500 JSONL (default {DEFAULT_DATA})")
    parser.add_argument(
        "--workers", default="1,2", help="comma-separated worker counts (default 1,2); 0 = in-process, no hard limit"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="hard per-item limit in seconds")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (fresh pool each); the median is reported")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N problems")
    parser.add_argument("--markdown", action="store_true", help="print the results as markdown table rows")
    parser.add_argument("--show-errors", type=int, default=0, metavar="N", help="print N disagreements")
    args = parser.parse_args()

    rows = [json.loads(line) for line in args.data.open() if line.strip()][: args.limit]
    items, labels, cats = build(rows)
    counts = Counter(cats)
    print(
        f"{len(rows)} problems -> {len(items)} responses "
        f"({counts['correct']} correct, {counts['reformatted']} reformatted, {counts['wrong']} wrong); "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, timeout {args.timeout:g} s, "
        f"load average {os.getloadavg()[0]:.2f} at start",
        file=sys.stderr,
    )

    table = []
    for workers in [int(w) for w in args.workers.split(",")]:
        times = []
        if workers == 0:  # in-process baseline without any time limit: what the pool's IPC costs
            for _ in range(args.repeat):
                # A fresh process per run, like a fresh pool: math-verify and sympy memoise parses,
                # so a warm process would grade repeats faster than unseen responses.
                ctx = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
                    elapsed_run, results = ex.submit(_time_in_process, items).result()
                times.append(elapsed_run)
        for _ in range(args.repeat if workers > 0 else 0):
            # A fresh pool per run: math-verify's parse caches in a warm worker would make repeats
            # look faster than grading unseen responses. Worker start-up is not timed.
            with GradingPool(num_workers=workers, timeout_s=args.timeout) as pool:
                start = time.perf_counter()
                results = pool.grade_many(items)
                times.append(time.perf_counter() - start)
        elapsed = statistics.median(times)
        agree = [r.correct == lab for r, lab in zip(results, labels)]
        per_cat = {c: sum(a for a, k in zip(agree, cats) if k == c) / counts[c] for c in counts}
        reasons = Counter(r.reason for r in results)
        in_parent = reasons["string_match"] + reasons["no_answer"] + reasons["choice"]
        table.append(
            {
                "workers": workers,
                "items": len(items),
                "to_workers": len(items) - in_parent,
                "seconds": elapsed,
                "best_seconds": min(times),
                "items_per_s": len(items) / elapsed,
                "agreement": sum(agree) / len(agree),
                **{f"agree_{c}": v for c, v in per_cat.items()},
                "timeouts": reasons["timeout"],
                "errors": reasons["error"],
            }
        )
        shown = 0
        for item, res, lab, cat in zip(items, results, labels, cats):
            if res.correct != lab and shown < args.show_errors:
                shown += 1
                print(f"  [{cat}] gold={item.gold!r} pred={res.pred!r} -> {res}", file=sys.stderr)

    if args.markdown:
        print(
            "| workers | responses | sent to workers | median s | best s | responses/s | agreement "
            "| correct → correct | reformatted → correct | wrong → incorrect | timeouts |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in table:
            label = "in-process (no pool)" if t["workers"] == 0 else str(t["workers"])
            print(
                f"| {label} | {t['items']} | {t['to_workers']} | {t['seconds']:.2f} | {t['best_seconds']:.2f} "
                f"| {t['items_per_s']:.0f} | {100 * t['agreement']:.1f}% | {100 * t['agree_correct']:.1f}% "
                f"| {100 * t.get('agree_reformatted', float('nan')):.1f}% | {100 * t['agree_wrong']:.1f}% "
                f"| {t['timeouts']} |"
            )
    else:
        for t in table:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}))


if __name__ == "__main__":  # required: the pool's spawned workers re-import this module
    main()
