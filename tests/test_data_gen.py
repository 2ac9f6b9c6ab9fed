"""Data stages on hand-written teacher outputs: real grader, real embeddings, no model needed."""

import random
from pathlib import Path

import numpy as np
import pytest

from sandlab.config import AgreementStage, DedupStage, ExportStage, GenerationStage
from sandlab.data_gen.agreement import filter_by_agreement
from sandlab.data_gen.dedup import dedup
from sandlab.data_gen.export import export_sft
from sandlab.data_gen.generate import build_requests, generate_problems, parse_problem
from sandlab.data_gen.taxonomy import Taxonomy
from sandlab.errors import ConfigError
from sandlab.grading import GradingPool
from sandlab.inference.base import ChatBackend, Completion
from sandlab.text import normalize_text

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool():
    with GradingPool(num_workers=1, timeout_s=5) as p:
        yield p


def test_parse_problem_takes_tags_after_reasoning():
    text = "<think>maybe <Q>draft</Q><S>\\boxed{1}</S></think><Q>Find x if 2x=10.</Q>\n<S>x = 5, so \\boxed{5}</S>"
    fields, reason = parse_problem(text)
    assert reason is None
    assert fields == {"problem": "Find x if 2x=10.", "reference_solution": "x = 5, so \\boxed{5}", "reference_answer": "5"}


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty_output"),
        ("<think>only thinking, cut off", "empty_output"),
        ("A problem without tags. \\boxed{3}", "missing_problem_tag"),
        ("<Q>Find x.</Q> no solution", "missing_solution_tag"),
        ("<Q>Find x.</Q><S>It is five.</S>", "missing_answer"),
    ],
)
def test_parse_problem_drop_reasons(text, reason):
    assert parse_problem(text) == (None, reason)


def test_taxonomy_draws_distinct_branches_deterministically():
    tax = Taxonomy.load(ROOT / "data_gen/taxonomies/math.yaml")
    draws = [tax.draw(random.Random(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    for _ in range(50):
        d = tax.draw(random.Random(_))
        assert d.primary != d.secondary and d.topic in tax.branches[d.primary]
    with pytest.raises(ConfigError):
        Taxonomy.load(ROOT / "data_gen/taxonomies/missing.yaml")


class ScriptedBackend(ChatBackend):
    """Replays fixed teacher outputs; stands in for a teacher that can write real problems (a 32B model)."""

    def __init__(self, outputs):
        self.outputs = outputs
        self.seen = []

    def _generate(self, conversations, sampling, *, desc, seeds):
        self.seen.extend(conversations)
        return [[self.outputs[i % len(self.outputs)]] for i in range(len(conversations))]


def test_generate_stage_ids_prefill_and_drops():
    cfg = GenerationStage(num_problems=4, response_prefix="<Q>")
    requests = build_requests(cfg, ROOT, seed=7)
    assert [r["id"] for r in requests] == [r["id"] for r in build_requests(cfg, ROOT, seed=7)]
    assert len({r["id"] for r in requests}) == 4
    outputs = [
        Completion("Find 2+2.</Q><S>It is \\boxed{4}.</S>", 10, 12, "stop"),
        Completion("Find 2+", 10, 320, "length"),
        Completion("", 10, 0, "error", error="HTTP 500"),
        Completion("garbage", 10, 3, "stop"),
    ]
    backend = ScriptedBackend(outputs)
    kept, dropped = generate_problems(backend, requests, cfg, teacher="t")
    assert backend.seen[0][-1] == {"role": "assistant", "content": "<Q>"}
    assert [k["reference_answer"] for k in kept] == ["4"]
    assert sorted(d["reason"] for d in dropped) == ["missing_problem_tag", "teacher_error", "truncated"]


def _solved(pid, answers, reference="5"):
    return {
        "id": pid, "problem": f"problem {pid}", "reference_solution": f"ref \\boxed{{{reference}}}", "reference_answer": reference,
        "solutions": [{"text": f"sol {a} \\boxed{{{a}}}" if a else "no answer", "answer": a} for a in answers],
    }


@pytest.mark.parametrize("cluster_batch", [1, 2, 256])  # answers clustered per problem, across a batch boundary, all at once
def test_agreement_uses_math_equivalence(pool, monkeypatch, cluster_batch):
    monkeypatch.setattr("sandlab.data_gen.agreement.CLUSTER_BATCH", cluster_batch)
    records = [
        _solved("a", ["5", "5.0", "\\frac{10}{2}"]),  # unanimous through equivalence
        _solved("b", ["5", "6", "7"]),  # reference + one solution: 2 of 4 votes
        # Nothing to cluster, and before "c" so that clustered problems and records are numbered differently.
        _solved("d", [None, None, None], reference=None) | {"reference_answer": None},
        _solved("c", [None, None, None]),  # only the reference parses
    ]
    kept, dropped = filter_by_agreement(records, AgreementStage(min_agreement=1.0, min_votes=2), pool, include_reference=True)
    assert [k["id"] for k in kept] == ["a"]
    assert kept[0]["agreement"] == 1.0 and kept[0]["solution"].startswith("sol 5")
    reasons = {d["id"]: d["reason"] for d in dropped}
    assert reasons == {"b": "disagreement", "c": "disagreement", "d": "no_parsable_answers"}
    kept, _ = filter_by_agreement(records[:2], AgreementStage(min_agreement=0.5, min_votes=2), pool, include_reference=True)
    assert [k["id"] for k in kept] == ["a", "b"]


@pytest.mark.slow
def test_dedup_exact_and_near_duplicates():
    records = [
        {"id": "1", "problem": "Find the number of positive divisors of 360."},
        {"id": "2", "problem": "find the number of positive   divisors of 360"},  # reformatted copy
        {"id": "3", "problem": "Find the number of positive divisors of the number 360."},  # paraphrase
        {"id": "4", "problem": "A fair die is rolled twice. What is the probability the sum is 7?"},
    ]
    kept, dropped = dedup(records, DedupStage(threshold=0.9))
    assert [k["id"] for k in kept] == ["1", "4"]
    assert {d["id"]: (d["reason"], d["duplicate_of"]) for d in dropped} == {"2": ("exact_duplicate", "1"), "3": ("near_duplicate", "1")}
    assert normalize_text("Find  $x$.") == normalize_text("find x")


def test_export_keeps_trace_and_appends_missing_answer():
    recs = [
        {"id": "a", "problem": "P1", "solution": "long reasoning " * 5 + "\\boxed{3}", "answer": "3"},
        {"id": "b", "problem": "P2", "solution": "reasoning without box " * 5, "answer": "7"},
        {"id": "c", "problem": "P3", "solution": "short \\boxed{1}", "answer": "1"},
    ]
    kept, dropped = export_sft(recs, ExportStage(min_words=5))
    assert [k["id"] for k in kept] == ["a", "b"] and dropped[0]["reason"] == "too_short"
    assert kept[0]["completion"][0]["content"] == recs[0]["solution"]
    assert kept[1]["completion"][0]["content"].endswith("\\boxed{7}.")
    assert kept[0]["prompt"][-1] == {"role": "user", "content": "P1"}


@pytest.mark.parametrize("answer, numeric", [("42", True), ("-3.5", True), ("\\frac{3}{4}", True), ("2\\sqrt{3}", True), ("30^\\circ", True),
                                             ("x+1", False), ("16 + 2*18 = 16 + 2Q", False), ("7 + 2i", False), ("", False)])
def test_numeric_answer_rule(answer, numeric):
    from sandlab.data_gen.agreement import is_numeric_answer

    assert is_numeric_answer(answer) is numeric


def test_agreement_drops_non_numeric_majority(pool):
    rec = _solved("e", ["x+1", "x + 1", "x+1"], reference=None) | {"reference_answer": None}
    kept, dropped = filter_by_agreement([rec], AgreementStage(min_agreement=1.0, min_votes=2), pool, include_reference=True)
    assert not kept and dropped[0]["reason"] == "non_numeric_answer"
    kept, _ = filter_by_agreement([rec], AgreementStage(min_agreement=1.0, min_votes=2, require_numeric=False), pool, include_reference=True)
    assert len(kept) == 1


@pytest.mark.slow
def test_minhash_catches_near_identical_wording_only():
    base = ("Let ABCD be a convex quadrilateral with AB = 7, BC = 9, CD = 11 and DA = 13, and let its diagonals meet at P. "
            "Find the largest possible area of triangle APB, expressed as m/n, and report m + n.")
    records = [
        {"id": "a", "problem": base},
        {"id": "b", "problem": base.replace("largest possible", "largest")},  # one word dropped
        {"id": "c", "problem": "A bag has 3 red and 5 blue marbles. Two are drawn without replacement. Find the probability both are red."},
    ]
    kept, dropped = dedup(records, DedupStage(threshold=0.99))  # embedding layer off in effect
    assert [k["id"] for k in kept] == ["a", "c"]
    assert dropped[0]["reason"] == "minhash_duplicate" and dropped[0]["duplicate_of"] == "a" and dropped[0]["jaccard"] >= 0.8


def test_embedding_dedup_ivf_path_keeps_first_of_each_group():
    """Precomputed vectors, IVF index: each planted near-copy is dropped in favour of its earliest original."""
    rng = np.random.default_rng(0)
    originals = rng.normal(size=(3000, 32)).astype(np.float32)
    copies_of = rng.choice(3000, size=300, replace=False)
    copies = originals[copies_of] + 0.01 * rng.normal(size=(300, 32)).astype(np.float32)
    vectors = np.concatenate([originals, copies])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [{"id": str(i), "problem": f"record {i} " + "x" * (i % 7)} for i in range(len(vectors))]
    cfg = DedupStage(threshold=0.98, minhash=False, ivf_min_records=1000, nprobe=16)
    kept, dropped = dedup(records, cfg, vectors=vectors)
    assert len(kept) == 3000
    assert sorted((int(d["id"]), int(d["duplicate_of"])) for d in dropped) == sorted((3000 + c, int(o)) for c, o in enumerate(copies_of))


def test_novelty_ivf_path_drops_near_copies_of_a_large_corpus():
    """A corpus above ivf_min_records goes through the IVF index; planted near-copies are caught,
    fresh problems are kept, and each drop names its nearest corpus item."""
    from sandlab.config import NoveltyStage
    from sandlab.data_gen.novelty import filter_novelty

    rng = np.random.default_rng(1)
    corpus = rng.normal(size=(5000, 32)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    copied = rng.choice(5000, size=50, replace=False)
    queries = np.concatenate([corpus[copied] + 0.01 * rng.normal(size=(50, 32)), rng.normal(size=(50, 32))]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    records = [{"id": f"q{i}", "problem": f"problem {i}"} for i in range(100)]
    cfg = NoveltyStage(threshold=0.95, ivf_min_records=1000, nprobe=16)
    kept, dropped = filter_novelty(records, cfg, corpus_vectors=corpus, vectors=queries)
    assert [r["id"] for r in kept] == [f"q{i}" for i in range(50, 100)]
    assert [d["nearest_corpus_index"] for d in dropped] == [int(c) for c in copied]


@pytest.mark.parametrize("branches, leaf", [
    ("coding: {python: [write a function, ''], sql: 1}\n  physics: [optics]", "coding/python"),
    ("coding: {python: [], sql: 1}\n  physics: [optics]", "coding/python"),
    ("coding: {python: null, sql: 1}\n  physics: [optics]", "coding/python"),
    ("coding: {python: 1}\n  physics: []", "'physics'"),
    ("coding: {python: 1}\n  physics:", "'physics'"),
    ("coding: {python: 1}\n  physics: [optics, null]", "physics"),
])
def test_a_taxonomy_with_an_empty_leaf_names_it_in_one_line(tmp_path, branches, leaf):
    path = tmp_path / "bad.yaml"
    path.write_text(f"domain: x\nbranches:\n  {branches}\n")
    with pytest.raises(ConfigError, match="empty leaf") as err:
        Taxonomy.load(path)
    assert leaf in str(err.value) and "\n" not in str(err.value)


def test_ngram_hashes_match_exactly_the_shared_ngrams():
    """Two texts share an n-gram hash exactly when word_ngrams says they share an n-gram (small vocabulary,
    so many do), and texts shorter than n count as one n-gram of all their words."""
    from sandlab.text import ngram_hashes, word_hashes, word_ngrams

    rng = np.random.default_rng(3)
    vocab = ["a", "b", "c", "d", "x1", "frac"]
    texts = [" ".join(rng.choice(vocab, size=int(rng.integers(0, 9)))) for _ in range(120)]
    grams, owner = ngram_hashes(*word_hashes(texts), 3)
    by_text = [set(grams[owner == i].tolist()) for i in range(len(texts))]
    exact = [word_ngrams(t, 3) for t in texts]
    assert [len(h) for h in by_text] == [len(g) for g in exact]
    shared_by_hash = {(i, j) for i in range(len(texts)) for j in range(i) if by_text[i] & by_text[j]}
    shared = {(i, j) for i in range(len(texts)) for j in range(i) if exact[i] & exact[j]}
    assert shared_by_hash == shared and 50 < len(shared) < len(texts) * (len(texts) - 1) // 2


def test_minhash_estimates_jaccard_and_lsh_keeps_the_first_kept_copy():
    from sandlab.data_gen.dedup import minhash_duplicates, minhash_signatures
    from sandlab.text import normalize_text, word_ngrams

    rng = np.random.default_rng(4)
    vocab = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choice(vocab, size=60)) for _ in range(100)]
    edited = [" ".join(w if rng.random() > rate else rng.choice(vocab) for w in t.split())
              for t, rate in zip(base, np.linspace(0.0, 0.3, 100))]
    signatures = minhash_signatures(base + edited, num_perm=64, shingle=3)
    errors = []
    for i in range(100):
        a, b = word_ngrams(normalize_text(base[i]), 3), word_ngrams(normalize_text(edited[i]), 3)
        errors.append(abs(float(np.mean(signatures[i] == signatures[100 + i])) - len(a & b) / len(a | b)))
    assert np.mean(errors) < 0.06 and max(errors) < 0.25
    # Greedy keep-first against a direct loop over all earlier kept records sharing a band.
    found = minhash_duplicates(signatures, bands=16, threshold=0.6)
    expected: dict[int, tuple[int, float]] = {}
    rows = 64 // 16
    bands = signatures.reshape(len(signatures), 16, rows)
    for i in range(len(signatures)):
        best = None
        same_band = (bands[:i] == bands[i]).all(axis=2).any(axis=1)
        scores = (signatures[:i] == signatures[i]).mean(axis=1)
        for j in range(i):
            if j not in expected and same_band[j] and scores[j] >= 0.6 and (best is None or scores[j] > best[1]):
                best = (j, float(scores[j]))
        if best is not None:
            expected[i] = best
    assert found == expected and 10 < len(found) < 100


def test_normalize_text_is_the_regex_definition():
    """The translate-based normalization equals its definition: lower-case, LaTeX noise out, every run of
    characters outside [0-9a-z] one space, stripped (the reference is written with regexes)."""
    import re

    from sandlab.text import _LATEX_NOISE, normalize_text

    def reference(text):
        text = _LATEX_NOISE.sub(" ", text.lower().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
        return re.sub(r"[^0-9a-z]+", " ", text).strip()

    rng = np.random.default_rng(5)
    alphabet = list("aZ09 \t\n.,$\\{}^_-") + ["\\dfrac", "\\left(", "\\text{", "\\,", "é", "Å", "\u212a", "π", "\x00", "\u2003", "İ", "ß"]
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 30)))) for _ in range(3000)]
    texts += ["Find $\\dfrac{1}{2}$  of 10.", "", "   ", "\\textbf{Kelvin} \u212a"]
    assert [normalize_text(t) for t in texts] == [reference(t) for t in texts]
    assert normalize_text("Find $\\dfrac{1}{2}$  of 10.") == "find frac 1 2 of 10"
