"""Answer agreement: keep a problem when enough independent answers are equivalent (shared grader)."""

from __future__ import annotations

import re

from sandlab.config import AgreementStage
from sandlab.grading import GradeItem, GradingPool
from sandlab.records import Record

# Numbers written plainly or in LaTeX: 42, -3.5, 1,000, \frac{3}{4}, 2\sqrt{3}, 5\pi/6, 2^{10}, 30^\circ.
_NUMERIC = re.compile(r"^(?:[\d\s.,+\-*/^(){}√]|\\d?frac|\\sqrt|\\pi|\\cdot|\\times|\\left|\\right|\^\\circ|\\%|%)+$")


def is_numeric_answer(answer: str) -> bool:
    return bool(re.search(r"\d", answer)) and bool(_NUMERIC.match(answer.strip()))


def cluster_answers(answers: list[str], pool: GradingPool) -> list[list[int]]:
    """Greedy equivalence clusters: each answer joins the first cluster whose representative it equals."""
    clusters: list[list[int]] = []
    for i, answer in enumerate(answers):
        if clusters:
            reps = [answers[c[0]] for c in clusters]
            results = pool.grade_many([GradeItem(response=f"\\boxed{{{answer}}}", gold=rep) for rep in reps])
            match = next((ci for ci, r in enumerate(results) if r.correct), None)
            if match is not None:
                clusters[match].append(i)
                continue
        clusters.append([i])
    return clusters


def filter_by_reference(records: list[Record], cfg: AgreementStage, pool: GradingPool) -> tuple[list[Record], list[Record]]:
    """Distillation mode: keep a problem when at least ``min_votes`` solutions match its reference
    answer; the first matching solution becomes the trace."""
    items = [GradeItem(response=s["text"], gold=str(rec["reference_answer"])) for rec in records for s in rec["solutions"]]
    grades = iter(pool.grade_many(items, desc="verify against reference"))
    kept, dropped = [], []
    for rec in records:
        matches = [s for s in rec["solutions"] if next(grades).correct]
        stats = {"verified": len(matches), "total_votes": len(rec["solutions"])}
        if len(matches) >= cfg.min_votes:
            kept.append({**rec, **stats, "agreement": len(matches) / len(rec["solutions"]), "answer": str(rec["reference_answer"]), "solution": matches[0]["text"]})
        else:
            dropped.append({**rec, **stats, "reason": "reference_mismatch"})
    return kept, dropped


def filter_by_agreement(records: list[Record], cfg: AgreementStage, pool: GradingPool, *, include_reference: bool) -> tuple[list[Record], list[Record]]:
    from tqdm.auto import tqdm  # noqa: PLC0415

    kept, dropped = [], []
    for rec in tqdm(records, desc="answer agreement", unit="problem", dynamic_ncols=True):
        # votes: (answer, index into solutions or -1 for the reference)
        votes = [(s["answer"], i) for i, s in enumerate(rec["solutions"]) if s["answer"]]
        if include_reference and rec.get("reference_answer"):
            votes.append((rec["reference_answer"], -1))
        total = len(rec["solutions"]) + (1 if include_reference and rec.get("reference_answer") else 0)
        if not votes:
            dropped.append({**rec, "reason": "no_parsable_answers"})
            continue
        clusters = cluster_answers([a for a, _ in votes], pool)
        best = max(clusters, key=len)
        share = len(best) / total
        stats = {"agreement": round(share, 4), "votes": len(best), "total_votes": total}
        if len(best) < cfg.min_votes or share < cfg.min_agreement:
            dropped.append({**rec, **stats, "reason": "disagreement"})
            continue
        answer = votes[best[0]][0]
        if cfg.require_numeric and not is_numeric_answer(answer):
            dropped.append({**rec, **stats, "answer": answer, "reason": "non_numeric_answer"})
            continue
        solution_ids = [votes[j][1] for j in best if votes[j][1] >= 0]
        chosen = rec["solutions"][solution_ids[0]]["text"] if solution_ids else rec["reference_solution"]
        kept.append({**rec, **stats, "answer": answer, "solution": chosen})
    return kept, dropped
