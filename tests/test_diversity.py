"""Diversity measures of a taxonomy-generated dataset (sandlab.data_gen.diversity): coverage, distinct-n,
embedding spread, near duplicates, the per-leaf cap and the plot. Hand-made vectors, no model loads;
every expected value is worked out by hand in a comment."""

import json
import math

import numpy as np
import pytest

from sandlab.data_gen import diversity
from sandlab.data_gen.diversity import (
    cap_per_leaf,
    coverage,
    distinct_n,
    diversity_report,
    embedding_spread,
    leaf_of,
    near_duplicate_rate,
    plot_diversity,
    record_leaf,
    taxonomy_leaves,
)
from sandlab.data_gen.taxonomy import Taxonomy

TAXONOMY = """\
domain: tiny
branches:
  coding: {python: [write a function, fix a bug], sql: 1}
  physics: [mechanics]
"""
LEAVES = ["coding / python / write a function", "coding / python / fix a bug", "coding / sql", "physics / mechanics"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def unit(*xs: float) -> list[float]:
    v = np.asarray(xs, dtype=np.float64)
    return list(v / np.linalg.norm(v))


def test_leaf_names():
    assert leaf_of("coding", "python", "write a function") == "coding / python / write a function"
    assert leaf_of("algebra", "quadratics") == "algebra / quadratics"
    assert leaf_of("physics") == "physics"
    assert leaf_of("algebra", "quadratics", "") == "algebra / quadratics"
    assert record_leaf({"branch": "algebra", "topic": "quadratics"}) == "algebra / quadratics"
    assert record_leaf({"problem": "no branch"}) is None


def test_coverage_of_a_tiny_taxonomy(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TAXONOMY)
    leaves = taxonomy_leaves(Taxonomy.load(path))
    assert leaves == LEAVES  # file order: tasks of python, then sql (no tasks), then physics' topic
    records = [
        {"branch": "coding", "topic": "python", "task": "write a function"},
        {"branch": "coding", "topic": "python", "task": "write a function"},
        {"branch": "coding", "topic": "sql"},
        {"branch": "physics", "topic": "mechanics"},
        {"branch": "chemistry", "topic": "organic"},  # not in the taxonomy
        {"problem": "no branch at all"},
    ]
    result = coverage(records, leaves)
    # hit: write a function, sql, mechanics = 3 of 4 leaves -> 0.75; off taxonomy: chemistry + no branch = 2
    assert result == {
        "leaves_total": 4, "leaves_hit": 3, "coverage": 0.75,
        "per_leaf": {"coding / python / write a function": 2, "coding / python / fix a bug": 0, "coding / sql": 1, "physics / mechanics": 1},
        "off_taxonomy": 2,
    }
    assert list(result["per_leaf"]) == LEAVES
    assert coverage([], []) == {"leaves_total": 0, "leaves_hit": 0, "coverage": 0.0, "per_leaf": {}, "off_taxonomy": 0}


def test_distinct_n_by_hand():
    texts = ["The cat sat.", "the cat ran"]
    # unigrams: the cat sat the cat ran = 6, unique {the, cat, sat, ran} = 4 -> 4/6
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)
    # bigrams: (the cat) (cat sat) (the cat) (cat ran) = 4, unique 3 -> 3/4
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)
    # trigrams: (the cat sat) (the cat ran) = 2, both unique -> 1.0
    assert distinct_n(texts, 3) == 1.0
    # "a dog" has no trigram and adds nothing; "the cat sat" repeats one: 3 trigrams, 2 unique -> 2/3
    assert distinct_n([*texts, "a dog", "the cat sat"], 3) == pytest.approx(2 / 3)
    assert distinct_n(["hi", ""], 2) == 0.0
    assert distinct_n([], 1) == 0.0


def test_mean_pairwise_distance_by_hand(monkeypatch):
    orthogonal = np.eye(4, dtype=np.float32)
    # every pair has dot 0 -> distance 1 - 0 = 1
    assert embedding_spread(orthogonal)["mean_pairwise_distance"] == pytest.approx(1.0)
    identical = np.tile(np.asarray(unit(1, 2, 3), dtype=np.float32), (5, 1))
    # every pair has dot 1 -> distance 0; no variance: empty spectrum, rank 0
    assert embedding_spread(identical) == {"mean_pairwise_distance": pytest.approx(0.0, abs=1e-6), "spectrum": [], "effective_rank": 0.0}
    three = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    # dots: v1.v2 = 0, v1.v3 = 0.6, v2.v3 = 0.8 -> mean over the 3 pairs 1.4/3 -> distance 1 - 1.4/3 = 1.6/3
    assert embedding_spread(three)["mean_pairwise_distance"] == pytest.approx(1.6 / 3, abs=1e-6)
    monkeypatch.setattr(diversity, "_CHUNK_ROWS", 2)  # the sums accumulate across chunks the same way
    assert embedding_spread(three)["mean_pairwise_distance"] == pytest.approx(1.6 / 3, abs=1e-6)
    for small in (np.zeros((0, 3)), np.ones((1, 3))):
        assert embedding_spread(small) == {"mean_pairwise_distance": 0.0, "spectrum": [], "effective_rank": 0.0}


def test_spectrum_and_effective_rank_of_equal_directions():
    # +-e1, +-e2, +-e3 in 5 dimensions: mean 0, covariance diag(2, 2, 2, 0, 0) / 5, so the normalized
    # eigenvalues are 1/3, 1/3, 1/3, 0, 0 -> entropy ln 3 -> effective rank exp(ln 3) = 3
    eye = np.eye(5, dtype=np.float32)[:3]
    spread = embedding_spread(np.concatenate([eye, -eye]), top_k=2)
    assert spread["effective_rank"] == pytest.approx(3.0)
    assert spread["spectrum"] == pytest.approx([1 / 3, 1 / 3])
    assert sum(spread["spectrum"]) <= 1.0
    # 15 pairs, three of them (v, -v) with dot -1, the rest 0: mean dot -3/15 -> distance 1.2
    assert spread["mean_pairwise_distance"] == pytest.approx(1.2)
    # one dominant direction: rows (+-2, +-1, 0) / sqrt(5) on the four sign choices -> covariance
    # diag(4, 1, 0) / 5 * 4/3, normalized 0.8, 0.2 -> rank exp(-(0.8 ln 0.8 + 0.2 ln 0.2))
    skew = np.array([[sx * 2, sy * 1, 0] for sx in (1, -1) for sy in (1, -1)], dtype=np.float32) / math.sqrt(5)
    spread = embedding_spread(skew)
    assert spread["spectrum"] == pytest.approx([0.8, 0.2, 0.0], abs=1e-6)
    assert spread["effective_rank"] == pytest.approx(math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2))), rel=1e-5)


def test_near_duplicate_rate_with_planted_duplicates():
    rows = np.array([unit(1, 0, 0, 0), unit(1, 0, 0, 0),  # identical pair
                     unit(0, 1, 0, 0), unit(0, 0, 1, 0), unit(0, 0, 0, 1)], dtype=np.float32)
    # only rows 0 and 1 have another row at cosine >= 0.9 -> 2/5
    assert near_duplicate_rate(rows, 0.9) == pytest.approx(0.4)
    # row 5 = (0, 0.96, 0.28, 0), a unit vector: cosine 0.96 with row 2, 0.28 with row 3, 0 with the rest
    near = np.array([unit(0, 0.96, 0.28, 0)], dtype=np.float32)
    # rows 0, 1 (identical), 2 and 5 (cosine 0.96) of 6 -> 4/6 at 0.95; only 0 and 1 at 0.97
    assert near_duplicate_rate(np.concatenate([rows, near]), 0.95) == pytest.approx(4 / 6)
    assert near_duplicate_rate(np.concatenate([rows, near]), 0.97) == pytest.approx(2 / 6)
    # three identical rows: every one has another identical row, whatever order faiss returns them in
    assert near_duplicate_rate(np.tile(rows[2], (3, 1)), 0.99) == 1.0
    assert near_duplicate_rate(rows[:1], 0.5) == 0.0


def test_near_duplicate_rate_through_the_ivf_index():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((390, 64)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    assert (base @ base.T - np.eye(390)).max() < 0.8  # random 64-d directions are far apart
    vectors = np.concatenate([base, base[:10]])  # 10 planted exact copies: rows 0-9 and 390-399
    # 20 of 400 rows have an identical twin -> 0.05
    assert near_duplicate_rate(vectors, 0.99, ivf_min_records=100, nprobe=8) == pytest.approx(0.05)


def test_cap_per_leaf_keeps_best_scores_in_input_order():
    records = [
        {"id": "a1", "branch": "algebra", "topic": "quadratics", "score": 1},
        {"id": "a2", "branch": "algebra", "topic": "quadratics"},  # unscored: after every score
        {"id": "b1", "branch": "physics", "topic": "mechanics", "score": 0},
        {"id": "a3", "branch": "algebra", "topic": "quadratics", "score": 3},
        {"id": "n1", "problem": "no branch", "score": 0},
        {"id": "a4", "branch": "algebra", "topic": "quadratics", "score": 2},
        {"id": "n2", "problem": "no branch"},
        {"id": "a5", "branch": "algebra", "topic": "quadratics", "score": 2},  # ties a4, which came first
    ]
    kept, dropped = cap_per_leaf(records, 2)
    # algebra / quadratics ranks a3 (3), a4 (2), a5 (2, later), a1 (1), a2 (none): keep a3, a4;
    # physics has one record; no-branch records are never capped
    assert [r["id"] for r in kept] == ["b1", "a3", "n1", "a4", "n2"]
    assert [r["id"] for r in dropped] == ["a1", "a2", "a5"]
    assert all(r["reason"] == "leaf_cap" for r in dropped)
    assert "reason" not in records[0]  # inputs untouched
    kept, dropped = cap_per_leaf(records, 3, score_field="missing")
    # nobody has the field: input order decides -> a1, a2, a3 kept; a4, a5 dropped
    assert [r["id"] for r in dropped] == ["a4", "a5"]
    with pytest.raises(ValueError):
        cap_per_leaf(records, 0)


def report_for(leaves, vectors):
    records = [{"branch": "coding", "topic": "python", "task": "write a function", "problem": "the cat sat"},
               {"branch": "physics", "topic": "mechanics", "problem": "the cat ran"}]
    return diversity_report(records, leaves=leaves, vectors=vectors, near_duplicate_threshold=0.9)


def test_diversity_report_is_json():
    vectors = np.eye(2, dtype=np.float32)
    report = report_for(LEAVES, vectors)
    assert json.loads(json.dumps(report)) == report
    assert report["records"] == 2
    assert report["coverage"]["leaves_hit"] == 2  # write a function and mechanics
    assert report["distinct"] == {"distinct-1": pytest.approx(4 / 6), "distinct-2": pytest.approx(3 / 4), "distinct-3": 1.0}
    # two orthogonal rows: distance 1, no near duplicate at 0.9
    assert report["embedding"]["mean_pairwise_distance"] == pytest.approx(1.0)
    assert report["embedding"]["near_duplicate_rate"] == 0.0
    assert report["embedding"]["near_duplicate_threshold"] == 0.9
    bare = report_for(None, None)
    assert bare["coverage"] is None and bare["embedding"] is None


def test_plot_diversity_writes_png(tmp_path):
    eye = np.eye(6, dtype=np.float32)[:3]
    full = report_for(LEAVES, np.concatenate([eye, -eye]))
    for name, report in [("full", full), ("no-embedding", {**full, "embedding": None}),
                         ("nothing", report_for(None, None))]:
        out = plot_diversity(report, tmp_path / "plots" / name / "diversity.png")
        assert out == tmp_path / "plots" / name / "diversity.png"
        assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 1000
    # more than 40 leaves: aggregated by branch
    many = [f"b{i % 5} / t{i}" for i in range(60)]
    big = {**full, "coverage": coverage([{"branch": "b0", "topic": "t0"}], many)}
    assert plot_diversity(big, tmp_path / "big.png").read_bytes()[:8] == PNG_MAGIC
