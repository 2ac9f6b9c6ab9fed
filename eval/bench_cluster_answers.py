"""Answer clustering of the agreement filter, side by side with the unbatched baseline.

Synthetic problems with k solutions each, the answers spelled in equivalent ways (1/2, \\frac{1}{2},
0.5, x=...), clustered by:
  old   the previous cluster_answers, kept here as the baseline: one pool round trip per answer
  new   sandlab's cluster_answers: one round trip per cluster round, per problem
  many  sandlab's cluster_answers_many: one round trip per round over all problems (what the filter
        uses, CLUSTER_BATCH problems at a time)
Every method must give identical clusters; a fresh, warmed pool per run; methods interleaved.

    python eval/bench_cluster_answers.py [--problems 200] [--solutions 8] [--workers N] [--repeat 5]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

from sandlab.data_gen.agreement import cluster_answers, cluster_answers_many
from sandlab.grading import GradeItem, GradingPool
from sandlab.grading.pool import default_num_workers


def old_cluster_answers(answers, pool, kind="math"):
    """The baseline: each answer against every cluster's representative, one round trip per answer."""
    clusters = []
    for i, answer in enumerate(answers):
        if clusters:
            reps = [answers[c[0]] for c in clusters]
            results = pool.grade_many([GradeItem(response=f"\\boxed{{{answer}}}", gold=rep, kind=kind) for rep in reps])
            match = next((ci for ci, r in enumerate(results) if r.correct), None)
            if match is not None:
                clusters[match].append(i)
                continue
        clusters.append([i])
    return clusters


def spellings(num, den):
    if den == 1:
        return [f"{num}", f"{num}.0", f"x={num}", f"\\frac{{{2 * num}}}{{2}}", f"{num}"]
    out = [f"{num}/{den}", f"\\frac{{{num}}}{{{den}}}", f"\\dfrac{{{num}}}{{{den}}}", f"\\frac{{{2 * num}}}{{{2 * den}}}"]
    if 1000 % den == 0 or 100 % den == 0:
        out.append(str(num / den))
    return out


def make_problems(n_problems, n_solutions, seed=0):
    rng = random.Random(seed)
    problems = []
    for _ in range(n_problems):
        values = [(rng.randint(1, 50), rng.choice([1, 1, 2, 3, 4, 5, 8])) for _ in range(3)]  # the right one, 2 distractors
        answers = []
        for _ in range(n_solutions):
            r = rng.random()
            num, den = values[0] if r < 0.6 else values[1] if r < 0.85 else values[2]
            answers.append(rng.choice(spellings(num, den)))
        problems.append(answers)
    return problems


class Counting:
    def __init__(self, pool):
        self.pool, self.calls, self.items = pool, 0, 0

    def grade_many(self, items, **kw):
        self.calls += 1
        self.items += len(items)
        return self.pool.grade_many(items, **kw)


def timed(fn, problems, workers):
    with GradingPool(num_workers=workers) as pool:  # workers started (and warmed) before timing
        counting = Counting(pool)
        start = time.perf_counter()
        out = fn(problems, counting)
        return time.perf_counter() - start, out, counting


METHODS = {
    "old (per answer)": lambda ps, pool: [old_cluster_answers(a, pool) for a in ps],
    "new (per round, per problem)": lambda ps, pool: [cluster_answers(a, pool) for a in ps],
    "many (per round, all problems)": lambda ps, pool: cluster_answers_many(ps, pool),
}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--solutions", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    problems = make_problems(args.problems, args.solutions)
    workers = args.workers or default_num_workers()
    print(f"{args.problems} problems x {args.solutions} solutions, {workers} workers, median of {args.repeat}")
    reference = None
    times = {name: [] for name in METHODS}
    counts = {}
    for _ in range(args.repeat):  # methods interleaved, so that other jobs' load hits them alike
        for name, fn in METHODS.items():
            t, out, counting = timed(fn, problems, workers)
            times[name].append(t)
            counts[name] = (counting.calls, counting.items, sum(len(c) for c in out))
            reference = reference or out
            assert out == reference, f"{name}: clusters differ"
    for name in METHODS:
        calls, items, n_clusters = counts[name]
        print(f"{name:32s} median {statistics.median(times[name]):6.2f} s  best {min(times[name]):6.2f} s  "
              f"{calls:5d} pool calls, {items} comparisons, {n_clusters} clusters, identical")
