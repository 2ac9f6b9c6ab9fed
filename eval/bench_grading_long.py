"""Grading reasoning-length responses: sandlab's grader against math-verify on the whole completion.

For each of the 500 MATH500 problems, one response of about 20k characters: a ``<think>`` block of
reasoning (other MATH500 solutions, their ``\\boxed`` removed, so only the final answer is boxed),
then the final answer. Half the responses end in the gold answer as written (the string fast path
decides them), the other half need maths: an equivalent rewrite where one is cheap to make
(``N`` -> ``N.0``, ``\\frac{a}{b}`` -> ``a/b``, ``\\dfrac``, spacing), else a wrong answer (the next
problem's, textually different). Both graders see the same responses in one run:

- sandlab: ``GradingPool.grade_many`` (answer extraction in this process, math-verify in 1 or 2
  worker processes under a hard time limit), a fresh pool per run (start-up not timed);
- open-r1's accuracy reward: math-verify ``parse`` of the gold and of the *whole* completion
  (``LatexExtractionConfig``, boxed first, as open-r1's ``accuracy_reward``) and ``verify``, serially
  in one fresh process.

It reports responses/s and whether the two agree on every verdict (and with the labels).

    python eval/bench_grading_long.py --markdown
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("SANDLAB_BENCHMARK_DIR", REPO.parent / "shared/benchmarks")) / "math500.jsonl"
sys.path.insert(0, str(REPO / "eval"))

from bench_grading import reformat  # noqa: E402

from sandlab.grading import GradeItem, GradingPool  # noqa: E402
from sandlab.grading.math_equiv import fast_equal  # noqa: E402


def build(rows: list[dict], chars: int) -> tuple[list[GradeItem], list[bool], list[str]]:
    filler = [re.sub(r"\\boxed\s*", "", r.get("solution") or r["problem"]) for r in rows]
    items, labels, cats = [], [], []
    n = len(rows)
    for i, row in enumerate(rows):
        gold = row["answer"]
        thought, j = [], i
        while sum(map(len, thought)) < chars:
            j = (j + 1) % n
            thought.append(filler[j])
        reasoning = "<think>\n" + "\n\n".join(thought)[:chars] + "\n</think>\n\n"
        if i % 2 == 0:
            answer, label, cat = gold, True, "as written"
        elif (ref := reformat(gold)) is not None:
            answer, label, cat = ref, True, "rewritten"
        else:
            for d in range(1, n):
                answer = rows[(i + d) % n]["answer"]
                if not (fast_equal(gold, answer) or fast_equal(answer, gold)):
                    break
            label, cat = False, "wrong"
        items.append(GradeItem(reasoning + f"Therefore the final answer is $\\boxed{{{answer}}}$.", gold))
        labels.append(label)
        cats.append(cat)
    return items, labels, cats


def open_r1_accuracy(pairs: list[tuple[str, str]]) -> tuple[float, list[bool]]:
    """open-r1's accuracy reward (math-verify on the whole completion), timed in this process."""
    from math_verify import LatexExtractionConfig, parse, verify
    from math_verify.parser import NormalizationConfig

    config = [LatexExtractionConfig(
        normalization_config=NormalizationConfig(nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True),
        boxed_match_priority=0, try_extract_without_anchor=False)]
    verify(parse("$\\frac{1}{2}$"), parse("$0.5$"))  # imports and parser set-up, as a worker's warm-up
    start = time.perf_counter()
    verdicts = []
    for completion, gold in pairs:
        gold_parsed = parse(f"${gold}$", extraction_mode="first_match")
        answer = parse(completion, extraction_config=config, extraction_mode="first_match")
        verdicts.append(bool(verify(gold_parsed, answer)) if gold_parsed else False)
    return time.perf_counter() - start, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--chars", type=int, default=20000, help="reasoning characters per response")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"error: {args.data} not found; set SANDLAB_BENCHMARK_DIR or --data")
    rows = [json.loads(line) for line in args.data.open() if line.strip()]
    items, labels, cats = build(rows, args.chars)
    mean_chars = statistics.mean(len(it.response) for it in items)
    print(f"{len(items)} responses of {mean_chars:,.0f} characters on average "
          f"({cats.count('as written')} as written, {cats.count('rewritten')} rewritten, {cats.count('wrong')} wrong); "
          f"Python {platform.python_version()}, {os.cpu_count()} CPUs", file=sys.stderr)

    rows_out = []
    ctx = multiprocessing.get_context("spawn")
    times = []
    for _ in range(args.repeat):
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:  # fresh process: cold math-verify caches
            elapsed, reference = ex.submit(open_r1_accuracy, [(it.response, it.gold) for it in items]).result()
        times.append(elapsed)
    rows_out.append({"grader": "math-verify on the whole completion (open-r1's accuracy reward), 1 process",
                     "seconds": statistics.median(times), "verdicts": reference})
    for workers in [int(w) for w in args.workers.split(",")]:
        times = []
        for _ in range(args.repeat):
            with GradingPool(num_workers=workers, timeout_s=5.0) as pool:
                start = time.perf_counter()
                results = pool.grade_many(items)
                times.append(time.perf_counter() - start)
        rows_out.append({"grader": f"sandlab GradingPool, {workers} worker{'s' if workers > 1 else ''}",
                         "seconds": statistics.median(times), "verdicts": [r.correct for r in results],
                         "to_workers": sum(r.reason not in ("string_match", "number_match", "no_answer") for r in results)})
    base = rows_out[0]["seconds"]
    if args.markdown:
        print("| grader | responses/s | median s | vs math-verify | sent to workers | verdicts = labels | verdicts = math-verify's |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows_out:
        same_labels = sum(v == lab for v, lab in zip(r["verdicts"], labels))
        same_ref = sum(v == w for v, w in zip(r["verdicts"], reference))
        if args.markdown:
            print(f"| {r['grader']} | {len(items) / r['seconds']:.0f} | {r['seconds']:.2f} | {base / r['seconds']:.1f}x | "
                  f"{r.get('to_workers', '-')} | {same_labels}/{len(items)} | {same_ref}/{len(items)} |")
        else:
            print(json.dumps({"grader": r["grader"], "per_s": round(len(items) / r["seconds"], 1), "labels": same_labels, "same_as_math_verify": same_ref}))


if __name__ == "__main__":  # the pool's spawned workers re-import this module
    main()
