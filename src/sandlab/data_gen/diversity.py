"""Diversity of a synthetic dataset generated from a taxonomy.

Filters (dedup, novelty, difficulty) can quietly collapse a taxonomy-driven dataset onto a few easy
leaves or a few phrasings; these pure functions measure how much of it survives:

* coverage: which taxonomy leaves (branch / topic / task) have records, and how many each;
* distinct-n (Li et al. 2016): unique word n-grams over all n-grams of the instructions (lexical);
* embedding spread: mean pairwise cosine distance, the normalized covariance spectrum and its
  effective rank (Roy & Vetterli 2007), and the near-duplicate rate (semantic);
* ``cap_per_leaf``: keep at most N records per leaf, best scores first, to rebalance a skewed set.

The ``diversity`` stage measures a run's records with them (and caps them with ``data.diversity.max_per_leaf``).

Everything scales to about a million records: no n x n matrix is ever built.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sandlab.data_gen.taxonomy import Taxonomy
from sandlab.embeddings import embed, similar_pairs
from sandlab.records import Record, write_json
from sandlab.stages import Kind, Stage, StageContext
from sandlab.text import normalize_text

LEAF_SEP = " / "
# Above this many leaves one bar per leaf is unreadable; the plot aggregates by branch.
MAX_PLOTTED_LEAVES = 40
# Rows converted to float64 at a time: bounded memory for 1M x d float32 inputs.
_CHUNK_ROWS = 16384


def leaf_of(branch: str, topic: str | None = None, task: str | None = None) -> str:
    """``"branch / topic / task"``, absent (None or empty) parts dropped."""
    return LEAF_SEP.join(str(part) for part in (branch, topic, task) if part)


def taxonomy_leaves(taxonomy: Taxonomy) -> list[str]:
    """Every leaf in file order: one per task, or the topic when it has no tasks."""
    leaves = []
    for branch, topics in taxonomy.branches.items():
        for topic, (_weight, tasks) in topics.items():
            leaves.extend([leaf_of(branch, topic, task) for task in tasks] or [leaf_of(branch, topic)])
    return leaves


def record_leaf(rec: Record) -> str | None:
    """The leaf a generated record was drawn from; None without a ``branch``."""
    branch = rec.get("branch")
    if not branch:
        return None
    return leaf_of(branch, rec.get("topic"), rec.get("task"))


def coverage(records: Iterable[Record], leaves: list[str]) -> dict[str, Any]:
    """Records per taxonomy leaf (all leaves, zeros included, taxonomy order) and the share hit."""
    per_leaf = dict.fromkeys(leaves, 0)
    off_taxonomy = 0
    for rec in records:
        leaf = record_leaf(rec)
        if leaf in per_leaf:
            per_leaf[leaf] += 1
        else:
            off_taxonomy += 1
    hit = sum(1 for count in per_leaf.values() if count)
    total = len(per_leaf)
    return {"leaves_total": total, "leaves_hit": hit, "coverage": hit / total if total else 0.0,
            "per_leaf": per_leaf, "off_taxonomy": off_taxonomy}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique word n-grams / all word n-grams over the whole set (0.0 without any n-gram)."""
    if n < 1:
        raise ValueError(f"distinct_n: n must be >= 1, got {n}")
    # 64-bit hashes in a flat array instead of a set of tuples: ~8 bytes per n-gram at 1M texts;
    # a collision (about n_grams^2 / 2^64) would undercount by one.
    hashes = array("q")
    for text in texts:
        words = normalize_text(text).split()
        hashes.extend(hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1))
    if not hashes:
        return 0.0
    return len(np.unique(np.frombuffer(hashes, dtype=np.int64))) / len(hashes)


def embedding_spread(vectors: np.ndarray, top_k: int = 10) -> dict[str, Any]:
    """Mean pairwise cosine distance, top-k normalized covariance eigenvalues and effective rank of
    L2-normalized rows ``vectors`` (n, d), in O(n*d^2) time and O(d^2) memory.

    With n < 2, or no variance at all (every row identical), the spectrum is empty and the effective
    rank 0.0."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"embedding_spread: vectors must be (n, d), got shape {vectors.shape}")
    n, d = vectors.shape
    if n < 2:
        return {"mean_pairwise_distance": 0.0, "spectrum": [], "effective_rank": 0.0}
    total = np.zeros(d, dtype=np.float64)
    gram = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, _CHUNK_ROWS):
        block = np.asarray(vectors[start:start + _CHUNK_ROWS], dtype=np.float64)
        total += block.sum(axis=0)
        gram += block.T @ block
    # sum_{i != j} v_i.v_j = |sum v|^2 - sum |v_i|^2, and sum |v_i|^2 = trace(gram).
    squared_norms = float(np.trace(gram))
    mean_similarity = (float(total @ total) - squared_norms) / (n * (n - 1))
    covariance = (gram - np.outer(total, total) / n) / (n - 1)
    eigenvalues = np.clip(np.linalg.eigvalsh(covariance), 0.0, None)[::-1]  # eigvalsh is ascending
    variance = float(eigenvalues.sum())
    # Identical rows leave only cancellation noise in gram - outer/n: treat it as no variance.
    if variance <= 1e-12 * max(squared_norms / n, 1e-300):
        return {"mean_pairwise_distance": 1.0 - mean_similarity, "spectrum": [], "effective_rank": 0.0}
    p = eigenvalues / variance
    p[p < 1e-12] = 0.0  # rank-deficient covariance (n <= d): rounding noise, not directions
    nonzero = p[p > 0]
    entropy = float(-(nonzero * np.log(nonzero)).sum())
    return {"mean_pairwise_distance": 1.0 - mean_similarity, "spectrum": [float(x) for x in p[:top_k]],
            "effective_rank": math.exp(entropy)}


def near_duplicate_rate(vectors: np.ndarray, threshold: float, *, ivf_min_records: int = 20000, nprobe: int = 8) -> float:
    """Share of rows with at least one other row at cosine >= ``threshold`` (0.0 for n < 2)."""
    n = len(vectors)
    if n < 2:
        return 0.0
    rows, _, _ = similar_pairs(vectors, threshold=threshold, k=1, ivf_min_records=ivf_min_records, nprobe=nprobe, earlier_only=False)
    return float(len(np.unique(rows))) / n


def diversity_report(records: Sequence[Record], *, leaves: list[str] | None, vectors: np.ndarray | None,
                     near_duplicate_threshold: float, ns: Sequence[int] = (1, 2, 3)) -> dict[str, Any]:
    """A JSON-serializable summary; ``vectors``: one normalized embedding per record's problem."""
    texts = [str(rec["problem"]) for rec in records if rec.get("problem")]
    embedding = None
    if vectors is not None:
        embedding = {**embedding_spread(vectors),
                     "near_duplicate_rate": near_duplicate_rate(vectors, near_duplicate_threshold),
                     "near_duplicate_threshold": float(near_duplicate_threshold)}
    return {"records": len(records),
            "coverage": coverage(records, leaves) if leaves is not None else None,
            "distinct": {f"distinct-{n}": distinct_n(texts, n) for n in ns},
            "embedding": embedding}


def plot_diversity(report: dict[str, Any], path: Path) -> Path:
    """Records per leaf (left) and the normalized embedding spectrum (right), as a PNG at ``path``."""
    from matplotlib.figure import Figure  # noqa: PLC0415  (no pyplot: no backend or global state)
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    path = Path(path)
    cov, emb = report.get("coverage"), report.get("embedding")
    labels: list[str] = []
    counts: list[int] = []
    by_branch = False
    if cov is not None:
        per_leaf = cov["per_leaf"]
        by_branch = len(per_leaf) > MAX_PLOTTED_LEAVES
        if by_branch:
            per_branch: dict[str, int] = {}
            for leaf, count in per_leaf.items():
                branch = leaf.split(LEAF_SEP, 1)[0]
                per_branch[branch] = per_branch.get(branch, 0) + count
            labels, counts = list(per_branch), list(per_branch.values())
        else:
            labels, counts = list(per_leaf), list(per_leaf.values())
        if cov.get("off_taxonomy"):
            labels.append("(off taxonomy)")
            counts.append(cov["off_taxonomy"])
    height = max(4.0, 0.28 * len(labels) + 1.8)
    fig = Figure(figsize=(14, height), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])

    if cov is None:
        _not_measured(left, "records per taxonomy leaf")
    else:
        y = np.arange(len(labels))
        colors = ["tab:blue"] * len(labels)
        if cov.get("off_taxonomy"):
            colors[-1] = "tab:gray"
        left.barh(y, counts, color=colors)
        left.set_yticks(y, labels, fontsize=8 if len(labels) > 20 else 9)
        for tick, c in zip(left.get_yticklabels(), counts):
            if c == 0:  # a zero-length bar is invisible: mark empty leaves by their label
                tick.set_color("tab:red")
        left.invert_yaxis()  # taxonomy order top to bottom
        for yi, c in zip(y, counts):
            left.text(c, yi, f" {c}", va="center", fontsize=7, color="tab:red" if c == 0 else "black")
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_xlabel("records")
        what = f"records per branch ({len(cov['per_leaf'])} leaves, aggregated by branch)" if by_branch else "records per taxonomy leaf"
        left.set_title(f"{what}; empty in red", fontsize=10)

    spectrum = [x for x in (emb or {}).get("spectrum") or [] if x > 0]  # log scale cannot show 0
    if emb is None:
        _not_measured(right, "embedding spectrum")
    elif not spectrum:
        _not_measured(right, "embedding spectrum", "no variance")
    else:
        ranks = np.arange(1, len(spectrum) + 1)
        right.bar(ranks, spectrum, color="tab:green")
        right.set_yscale("log")
        right.set_xticks(ranks)
        right.set_xlabel("eigenvalue rank")
        right.set_ylabel("share of total variance")
        right.set_title(f"embedding spectrum: effective rank {emb['effective_rank']:.1f}\nmean pairwise distance "
                        f"{emb['mean_pairwise_distance']:.3f}\nnear duplicates {emb['near_duplicate_rate']:.1%} "
                        f"(cosine >= {emb['near_duplicate_threshold']})", fontsize=10)

    coverage_text = f"coverage {cov['leaves_hit']}/{cov['leaves_total']} leaves ({cov['coverage']:.0%})" if cov else "coverage not measured"
    d2 = (report.get("distinct") or {}).get("distinct-2")
    distinct_text = f"distinct-2 {d2:.3f}" if d2 is not None else "distinct-2 not measured"
    fig.suptitle(f"{report.get('records', 0)} records: {coverage_text}, {distinct_text}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def _not_measured(ax: Any, what: str, why: str = "not measured") -> None:
    ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=14, color="gray", transform=ax.transAxes)
    ax.set_title(what, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def cap_per_leaf(records: Sequence[Record], max_per_leaf: int, score_field: str = "score") -> tuple[list[Record], list[Record]]:
    """(kept, dropped): at most ``max_per_leaf`` records per leaf, highest ``score_field`` first
    (unscored after scored, ties in input order); kept stay in input order; leafless are never capped."""
    if max_per_leaf < 1:
        raise ValueError(f"cap_per_leaf: max_per_leaf must be >= 1, got {max_per_leaf}")
    by_leaf: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        leaf = record_leaf(rec)
        if leaf is not None:
            by_leaf.setdefault(leaf, []).append(i)
    dropped_ids: set[int] = set()
    for indices in by_leaf.values():
        if len(indices) > max_per_leaf:
            ranked = sorted(indices, key=lambda i: _score_key(records[i].get(score_field), i))
            dropped_ids.update(ranked[max_per_leaf:])
    kept = [rec for i, rec in enumerate(records) if i not in dropped_ids]
    dropped = [{**rec, "reason": "leaf_cap"} for i, rec in enumerate(records) if i in dropped_ids]
    return kept, dropped


def _score_key(score: Any, index: int) -> tuple[int, float, int]:
    # Missing, non-numeric and NaN scores rank after every real score.
    if isinstance(score, bool) or not isinstance(score, (int, float)) or math.isnan(score):
        return (1, 0.0, index)
    return (0, -float(score), index)


# ---- the diversity stage ---------------------------------------------------------------------
def run(ctx: StageContext, records: list[Record], offset: int) -> tuple[list[Record], list[Record]]:
    """Measure the records (and cap them per leaf with ``max_per_leaf``); data/diversity.json and
    data/diversity.png describe what is kept, and go to W&B."""
    from sandlab.tracking import log_diversity  # noqa: PLC0415

    cfg, generate = ctx.cfg.data.diversity, ctx.cfg.data.generate
    from_taxonomy = not generate.source and any(record_leaf(r) for r in records)
    leaves = taxonomy_leaves(Taxonomy.load(ctx.root / generate.taxonomy)) if from_taxonomy else None
    kept, dropped = cap_per_leaf(records, cfg.max_per_leaf) if cfg.max_per_leaf else (list(records), [])
    vectors = embed([r["problem"] for r in kept], model=cfg.embedding_model, batch_size=cfg.batch_size, device=cfg.embedding_device,
                    store=ctx.embedding_store) if kept else None
    report = diversity_report(kept, leaves=leaves, vectors=vectors, near_duplicate_threshold=cfg.near_duplicate_threshold, ns=cfg.distinct_n)
    report["capped"] = len(dropped)
    write_json(ctx.data_dir / "diversity.json", report)
    plot = plot_diversity(report, ctx.data_dir / "diversity.png")
    log_diversity(report, plot)
    return kept, dropped


STAGE = Stage("diversity", Kind.DATA, run, config=("data.diversity", "data.generate.taxonomy"), input_fields=("id", "problem"),
              input_hint="every record needs a stable id and a problem (the instruction)", hint="raise data.diversity.max_per_leaf")
