"""Teacher tokens per accepted problem: the solve stage with fixed k vs adaptive rounds (issue 17).

A simulated teacher answers each problem as a fixed function of (problem, seed): the problem's
reference answer with a per-problem probability q, else one of several wrong answers, with a
completion length drawn from the same seed. Both schemes run sandlab's real solve stage
(``solve_problems``) and agreement filter (``filter_by_agreement``, math-verify through the grading
pool) on the same problems, so the kept ids must be identical; the benchmark fails otherwise.

The per-problem q is drawn from a Beta distribution whose mean is set so that the filter's yield (the
share of problems kept) hits ``--yields``: 0.74 and 0.42 are AMD's published consistency yields of
gpt-oss-120b and DeepSeek-R1, 0.5 is the issue's goal. ``--concentration`` sets how much problems
differ: small = bimodal (a teacher that either knows a problem or does not), ``inf`` = every
problem alike (the worst case for adaptive sampling). Recipe settings as SAND: k=4, the reference
answer votes, unanimity.

    python data_gen/bench_adaptive_solve.py --markdown
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from pathlib import Path

from sandlab.config import AgreementStage, SamplingSettings, SolveStage
from sandlab.data_gen.agreement import filter_by_agreement
from sandlab.data_gen.prompts import load_prompt
from sandlab.data_gen.solve import round_sizes, solve_problems
from sandlab.grading import GradingPool
from sandlab.inference.base import ChatBackend, Completion

ROOT = Path(__file__).resolve().parents[1]


def _uniform(*parts) -> float:
    return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:12], 16) / 16**12


class SimulatedTeacher(ChatBackend):
    """Answers ``answer`` with probability q (from the problem text), else a wrong one; lengths are
    log-normal around ``mean_tokens`` (wrong solutions 1.3x longer, as reasoning models ramble)."""

    name = "simulated"

    def __init__(self, q_of: dict[str, tuple[float, str]], mean_tokens: int):
        self.q_of, self.mean_tokens = q_of, mean_tokens
        self.requests = 0

    def _generate(self, conversations, sampling, *, desc, seeds):
        rows = []
        for conv, seed in zip(conversations, seeds):
            key = conv[-1]["content"]
            q, answer = self.q_of[key]
            u = _uniform(key, seed)
            right = u < q
            # Wrong answers spread over 3 values, so two wrong ones sometimes agree with each other.
            text_answer = answer if right else str(int(answer) + 1 + int(_uniform(key, seed, "w") * 3))
            z = math.sqrt(-2 * math.log(max(_uniform(key, seed, "a"), 1e-12))) * math.cos(2 * math.pi * _uniform(key, seed, "b"))
            tokens = max(16, int(self.mean_tokens * (1.0 if right else 1.3) * math.exp(0.5 * z - 0.125)))
            rows.append([Completion(f"Reasoning.\nFinal answer: \\boxed{{{text_answer}}}", completion_tokens=tokens)])
            self.requests += 1
        return rows


def beta_qs(n: int, mean: float, concentration: float, rng: random.Random) -> list[float]:
    if math.isinf(concentration):
        return [mean] * n
    return [rng.betavariate(mean * concentration, (1 - mean) * concentration) for _ in range(n)]


def calibrate_mean(target_yield: float, k: int, concentration: float) -> float:
    """The Beta mean whose E[q^k] (all k solutions match the reference) is the target yield."""
    def expected_yield(mean: float) -> float:
        if math.isinf(concentration):
            return mean**k
        a, b = mean * concentration, (1 - mean) * concentration
        return math.prod((a + i) / (a + b + i) for i in range(k))  # E[q^k] of Beta(a, b)

    lo, hi = 1e-6, 1 - 1e-6
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_yield(mid) < target_yield else (lo, mid)
    return (lo + hi) / 2


def run_case(pool, n: int, k: int, target: float, concentration: float, sizes: list[int] | None, mean_tokens: int, seed: int) -> dict:
    rng = random.Random(f"{seed}-{target}-{concentration}")
    qs = beta_qs(n, calibrate_mean(target, k, concentration), concentration, rng)
    solve = SolveStage(k=k, include_reference=True, round_sizes=sizes, prompt="data_gen/prompts/solve.txt",
                       sampling=SamplingSettings(temperature=1.0, max_tokens=32768, seed=1000))
    agreement = AgreementStage(min_agreement=1.0, min_votes=3)
    problems = [{"id": f"p{i:06d}", "problem": f"Problem {i}: find the answer (item {seed}).", "reference_answer": str(100 + i)} for i in range(n)]
    # The teacher sees the rendered prompt: map it back to (q, reference answer).
    template = load_prompt(ROOT / solve.prompt, "data.solve.prompt", problem="")
    q_of = {template.format(problem=p["problem"]): (q, p["reference_answer"]) for p, q in zip(problems, qs)}
    teacher_fixed, teacher_adaptive = SimulatedTeacher(q_of, mean_tokens), SimulatedTeacher(q_of, mean_tokens)

    t0 = time.perf_counter()
    fixed = solve_problems(teacher_fixed, problems, solve, ROOT)
    kept_fixed, _ = filter_by_agreement(fixed, agreement, pool, include_reference=True)
    t1 = time.perf_counter()
    adaptive = solve_problems(teacher_adaptive, problems, solve, ROOT, agreement=agreement, pool=pool)
    kept_adaptive, _ = filter_by_agreement(adaptive, agreement, pool, include_reference=True)
    t2 = time.perf_counter()

    ids_f, ids_a = [r["id"] for r in kept_fixed], [r["id"] for r in kept_adaptive]
    if ids_f != ids_a or [r["solutions"] for r in kept_fixed] != [r["solutions"] for r in kept_adaptive]:
        sys.exit(f"kept sets differ: fixed {len(ids_f)}, adaptive {len(ids_a)} (yield {target}, concentration {concentration})")
    tokens_f = sum(s["completion_tokens"] for r in fixed for s in r["solutions"])
    tokens_a = sum(s["completion_tokens"] for r in adaptive for s in r["solutions"])
    kept = max(len(ids_f), 1)
    return {
        "yield_target": target, "concentration": concentration, "rounds": round_sizes(solve),
        "problems": n, "kept": len(ids_f), "yield": len(ids_f) / n,
        "samples_fixed": teacher_fixed.requests, "samples_adaptive": teacher_adaptive.requests,
        "tokens_per_kept_fixed": tokens_f / kept, "tokens_per_kept_adaptive": tokens_a / kept,
        "fewer_tokens": 1 - tokens_a / tokens_f, "seconds_fixed": t1 - t0, "seconds_adaptive": t2 - t1,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=2000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--yields", type=float, nargs="+", default=[0.74, 0.5, 0.42])
    ap.add_argument("--concentrations", type=float, nargs="+", default=[1.0, 3.0, math.inf],
                    help="Beta concentration of the per-problem agreement rate (inf: all problems alike)")
    ap.add_argument("--round-sizes", type=str, nargs="+", default=["doubling", "1,1,1,1"],
                    help="'doubling' (the default schedule 1,1,2,...) or comma-separated sizes")
    ap.add_argument("--mean-tokens", type=int, default=8000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    with GradingPool(num_workers=2, timeout_s=5.0) as pool:
        for schedule in args.round_sizes:
            sizes = None if schedule == "doubling" else [int(s) for s in schedule.split(",")]
            for target in args.yields:
                for c in args.concentrations:
                    row = run_case(pool, args.problems, args.k, target, c, sizes, args.mean_tokens, args.seed)
                    rows.append(row)
                    print(f"rounds {row['rounds']} yield {row['yield']:.2f} (target {target}) concentration {c}: "
                          f"{row['fewer_tokens']:.1%} fewer tokens, kept ids identical ({row['kept']})", flush=True)
    if args.markdown:
        print("\n| rounds | per-problem agreement rate | yield (kept / problems) | solutions drawn, fixed -> adaptive "
              "| teacher tokens per kept problem, fixed | adaptive | fewer tokens | kept ids |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for r in rows:
            spread = "all alike" if math.isinf(r["concentration"]) else f"Beta, concentration {r['concentration']:g}"
            print(f"| {','.join(map(str, r['rounds']))} | {spread} | {r['kept']}/{r['problems']} = {r['yield']:.2f} | "
                  f"{r['samples_fixed']:,} -> {r['samples_adaptive']:,} | {r['tokens_per_kept_fixed']:,.0f} | "
                  f"{r['tokens_per_kept_adaptive']:,.0f} | **{r['fewer_tokens']:.0%}** | identical |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
