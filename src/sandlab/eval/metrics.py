"""Evaluation metrics over saved samples (one row per item x sample, with ``correct`` and ``pred``).

* pass@1: the mean over all samples of all items (each item weighted equally);
* its standard deviation across sample sets (set j = the j-th sample of every item), as papers that
  report "avg of 64" give it, and a bootstrap 95% interval over items;
* unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k) per item, averaged;
* maj@k: the most common extracted answer among the first k samples is right (ties: earliest);
* mean output tokens, share truncated at the length limit, share without a parsable answer;
* code benchmarks: samples whose sandbox failed (``correct`` None) are left out and counted as
  ``infra_errors``; maj@k is not defined (no extracted answer); pass@1 by ``difficulty`` and ``platform``.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples with c correct."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_correct(samples: list[dict[str, Any]], k: int) -> bool:
    """Whether the most common non-empty prediction among the first k samples is correct."""
    first = sorted(samples, key=lambda s: s["sample"])[:k]
    votes = Counter(_norm(s["pred"]) for s in first if s.get("pred"))
    if not votes:
        return False
    top = max(votes.values())
    winner = next(_norm(s["pred"]) for s in first if s.get("pred") and votes[_norm(s["pred"])] == top)
    return any(s["correct"] for s in first if s.get("pred") and _norm(s["pred"]) == winner)


def _norm(pred: str) -> str:
    return " ".join(str(pred).split()).rstrip(".")


def group_by_item(samples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_item: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_item.setdefault(s["item_id"], []).append(s)
    return by_item


def bootstrap_interval(values: list[float], *, iterations: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of the mean of per-item values (items resampled with replacement)."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(iterations))
    lo = means[int((1 - level) / 2 * iterations)]
    hi = means[min(iterations - 1, int((1 + level) / 2 * iterations))]
    return (lo, hi)


def breakdown(samples: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """pass@1 (percent, items weighted equally) and the item count per value of ``key`` (difficulty,
    platform); items without the field are left out."""
    groups: dict[str, list[float]] = {}
    for group in group_by_item(samples).values():
        value = group[0].get(key)
        if value not in (None, ""):
            groups.setdefault(str(value), []).append(statistics.fmean(float(s["correct"]) for s in group))
    return {value: {"pass@1": 100.0 * statistics.fmean(rates), "items": len(rates)} for value, rates in sorted(groups.items())}


def summarize(samples: list[dict[str, Any]], *, ks: tuple[int, ...] = (2, 4, 8, 16, 32, 64), seed: int = 0) -> dict[str, Any]:
    """All metrics of one benchmark, in percent where they are rates of correct answers."""
    code = any("statuses" in s for s in samples)
    infra = sum(s.get("correct") is None for s in samples)
    samples = [s for s in samples if s.get("correct") is not None]
    by_item = group_by_item(samples)
    if not by_item:
        return {"items": 0, "samples": 0, "pass@1": 0.0}
    per_item = [statistics.fmean(float(s["correct"]) for s in group) for group in by_item.values()]
    n_min = min(len(g) for g in by_item.values())
    sets = [statistics.fmean(float(sorted(g, key=lambda s: s["sample"])[j]["correct"]) for g in by_item.values()) for j in range(n_min)]
    lo, hi = bootstrap_interval(per_item, seed=seed)
    metrics: dict[str, Any] = {
        "items": len(by_item),
        "samples": len(samples),
        "samples_per_item": n_min,
        "pass@1": 100.0 * statistics.fmean(per_item),
        "pass@1_std": 100.0 * statistics.stdev(sets) if len(sets) > 1 else 0.0,
        "pass@1_ci95": [100.0 * lo, 100.0 * hi],
    }
    for k in ks:
        if 1 < k <= n_min:
            metrics[f"pass@{k}"] = 100.0 * statistics.fmean(pass_at_k(len(g), sum(s["correct"] for s in g), k) for g in by_item.values())
            if not code:
                metrics[f"maj@{k}"] = 100.0 * statistics.fmean(majority_correct(g, k) for g in by_item.values())
    metrics["mean_output_tokens"] = statistics.fmean(s["completion_tokens"] for s in samples)
    metrics["truncated_share"] = statistics.fmean(s["finish_reason"] == "length" for s in samples)
    if code:
        metrics["no_answer_share"] = statistics.fmean("no_code" in s["statuses"] for s in samples)
        metrics["infra_errors"] = infra
        for key in ("difficulty", "platform"):
            groups = breakdown(samples, key)
            if groups:
                metrics[f"by_{key}"] = groups
    else:
        metrics["no_answer_share"] = statistics.fmean(s["pred"] is None for s in samples)
    return metrics
