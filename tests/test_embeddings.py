"""Embedding models: the static (model2vec) option, per-stage choice, device resolution, build errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from sandlab import embeddings, models
from sandlab.config import DecontamStage, DedupStage, DiversityStage, NoveltyStage
from sandlab.errors import ConfigError, SandlabError

STATIC = "embedded://minilm-l6-static"
SOURCE = "Let x and y be positive integers with x + y = 20. Find the largest possible value of the product xy."
NEAR_COPY = "Let x and y be positive integers with x + y = 21. Find the largest possible value of the product xy."
UNRELATED = "A ball is thrown upward from a cliff; describe the forces acting on it when air resistance is ignored."


@pytest.fixture(scope="module")
def static_path() -> str:
    return models.resolve_model_path(STATIC)  # built by `make models` (cached), else built here (~40 s)


def test_static_model_is_distilled_from_minilm(static_path):
    assert embeddings.is_static_model(static_path)
    assert not embeddings.is_static_model(str(models.minilm_path()))
    vectors = embeddings.embed([SOURCE, NEAR_COPY, UNRELATED], model=STATIC)
    assert vectors.dtype == np.float32 and vectors.shape[0] == 3
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    near, far = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert near > far + 0.2, (near, far)


def test_dedup_uses_the_stage_model(static_path, monkeypatch):
    from sandlab.data_gen import dedup as dedup_mod

    seen = []
    real = dedup_mod.embed

    def spy(texts, **kwargs):
        seen.append(kwargs)
        return real(texts, **kwargs)

    monkeypatch.setattr(dedup_mod, "embed", spy)
    records = [{"id": "a", "problem": SOURCE}, {"id": "b", "problem": UNRELATED}, {"id": "c", "problem": NEAR_COPY}]
    cfg = DedupStage(embedding_model=STATIC, threshold=0.9, minhash=False, embedding_device="cpu", batch_size=7)
    kept, dropped = dedup_mod.dedup(records, cfg)
    assert [r["id"] for r in kept] == ["a", "b"]
    assert [(d["id"], d["reason"], d["duplicate_of"]) for d in dropped] == [("c", "near_duplicate", "a")]
    assert seen == [{"model": STATIC, "batch_size": 7, "device": "cpu", "store": None}]


def test_device_resolution(monkeypatch):
    import torch

    assert embeddings.resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert embeddings.resolve_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        embeddings.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert embeddings.resolve_device("auto") == "cuda"
    assert embeddings.resolve_device("cuda") == "cuda"
    with pytest.raises(ConfigError, match="choose one of"):
        embeddings.resolve_device("gpu")
    for stage in (DedupStage, DecontamStage, NoveltyStage, DiversityStage):
        with pytest.raises(ConfigError, match="embedding_device='gpu'"):
            stage(embedding_device="gpu")


def test_transformer_embedder_loads_on_the_resolved_device(monkeypatch):
    import torch

    loaded = []

    class FakeEncoder:
        def encode(self, texts, **kwargs):
            return np.ones((len(texts), 4), dtype=np.float32) / 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(embeddings, "_load", lambda path, device: loaded.append(device) or FakeEncoder())
    embeddings.embed(["x"], model="embedded://all-minilm-l6-v2", device="auto")
    embeddings.embed(["x"], model="embedded://all-minilm-l6-v2", device="cpu")
    assert loaded == ["cuda", "cpu"]


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_static_build_without_base_model_is_one_line(tmp_path):
    with pytest.raises(SandlabError) as info:
        models.prepare_minilm_static(tmp_path / "static", base=tmp_path / "no-such-model")
    assert "base model" in _one_line(info.value) and "make models" in str(info.value)
    assert not (tmp_path / "static").exists()


def test_static_build_without_model2vec_is_one_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "model2vec" else real(name, *a))
    monkeypatch.setenv("SANDLAB_CACHE", str(tmp_path))
    with pytest.raises(ConfigError) as info:
        models.prepare_minilm_static()
    assert "'model2vec' is not installed" in _one_line(info.value)
    with pytest.raises(SystemExit) as done:  # the `make models` entry point: one line, non-zero exit
        models.main(["--models", "minilm-l6-static"])
    assert str(done.value).startswith("error: ") and "model2vec" in _one_line(done.value)


def test_static_fast_path_equals_model2vec(static_path):
    """The word-cache shortcut against model2vec's own encode, on texts that take the shortcut and on
    those that must not (non-ASCII, control characters, a special token written out, model2vec's
    truncation, no words at all)."""
    model = embeddings._load_static(static_path)
    rng = np.random.default_rng(0)
    words = (SOURCE + " " + UNRELATED + " \\frac{3}{4} x^2+y_1 = 7.5, (a+b)! [1,2]").split()
    texts = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(300)]
    texts += ["", "   ", "Héllo wörld, café crème", "tab\tnew\nline\x0bcontrol", "What is [UNK] plus [MASK]?",
              " ".join(["antidisestablishmentarianism"] * 700), "x" * 5000, "Price: $5 & 10% off; 3 < 4 > 2 | ~`"]
    fast = embeddings.encode_static(model, texts)
    reference = np.asarray(model.encode(texts, show_progress_bar=False, use_multiprocessing=False), dtype=np.float32)
    for f, r, text in zip(fast, reference, texts):
        if not np.any(r):
            assert not np.any(f), text
            continue
        cosine = float(f @ r) / (np.linalg.norm(f) * np.linalg.norm(r))
        assert cosine > 0.9999, (cosine, text[:60])


def test_static_fast_path_reads_non_ascii_text_as_the_tokenizer_does(static_path):
    """Accents, Greek (final sigma), CJK, math symbols, typographic punctuation, no-break and zero-width
    spaces, combining marks, emoji and line separators: the shortcut splits the raw text as the
    tokenizer does after its normalizer, so the vectors equal model2vec's own encode."""
    model = embeddings._load_static(static_path)
    rng = np.random.default_rng(1)
    chars = list("éÅΑΣσς中文字×≤’–—\u00a0\u200b\u0301\u2028\x85İßπ😀°…½ﬁ\u1fefالعربيةภาษาไทย\u3000\u2003")
    chunks = ["ΟΔΟΣ end", "a\u0301b", " \u0301x", ".\u0301", "x\u200b.y", "3×4=12", "中a中", "İstanbul", "ﬁne", "a\u2028b", "½ cup"]
    words = "the a 2x+1 café ΑΣ 中文 £5 ‘quoted’ x² ≤ 3×4 — … naïve İ".split()
    texts = ["".join(rng.choice(chars + chunks, size=int(rng.integers(1, 12)))) + " " + " ".join(rng.choice(words, size=6)) for _ in range(300)]
    splitter = embeddings._UnicodePieces(model.tokenizer)
    shortcut = sum(splitter.pieces(t) is not None for t in texts)
    assert shortcut > 0.8 * len(texts)  # most take the shortcut (a text with U+0085 does not: Python splits there, BERT joins)
    fast = embeddings.encode_static(model, texts)
    reference = np.asarray(model.encode(texts, show_progress_bar=False, use_multiprocessing=False), dtype=np.float32)
    cosines = (fast * reference).sum(axis=1) / (np.linalg.norm(fast, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosines.min() > 0.9999, texts[int(cosines.argmin())]


def test_punctuation_learned_from_a_text_that_falls_back_splits_later_texts(static_path):
    """A text with new punctuation and a character the shortcut cannot read (U+0085) goes to model2vec;
    the punctuation it taught must still split the next texts (the tokenizer's pre-tokenizer is the reference)."""
    tokenizer = embeddings._load_static(static_path).tokenizer
    for mark in "–—‘’“”…«»¡¿،":
        splitter = embeddings._UnicodePieces(tokenizer)
        assert splitter.pieces(f"x{mark}y\x85") is None
        text = f"x{mark}y"
        expected = [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text))]
        assert [piece.lower() for piece in splitter.pieces(text)] == expected, mark


def test_static_embeddings_of_a_later_call_reuse_the_last_ones(static_path, monkeypatch):
    texts = [SOURCE, NEAR_COPY, UNRELATED, "A fourth text about triangles."]
    first = embeddings.embed(texts, model=STATIC)
    encoded = []
    real = embeddings.encode_static
    monkeypatch.setattr(embeddings, "encode_static", lambda model, batch, **kw: encoded.append(list(batch)) or real(model, batch, **kw))
    again = embeddings.embed([UNRELATED, "A new text.", SOURCE], model=STATIC)
    assert encoded == [["A new text."]]  # only the text the last call did not have
    np.testing.assert_array_equal(again[[0, 2]], first[[2, 0]])
    again[:] = 0  # the caller's copy: the kept vectors stay as they were
    np.testing.assert_array_equal(embeddings.embed([SOURCE], model=STATIC), first[[0]])


def _pairs_by_brute_force(vectors, threshold, k, earlier_only):
    """Every row against every other, one pair at a time: the reference for ``similar_pairs``."""
    expected = []
    for i in range(len(vectors)):
        others = []
        for j in range(len(vectors)):
            if (j < i if earlier_only else j != i):
                score = float(np.dot(vectors[i].astype(np.float64), vectors[j].astype(np.float64)))
                if score >= threshold:
                    others.append((-score, j))
        expected += [(i, j) for _, j in sorted(others)[:k]]
    return expected


@pytest.fixture(scope="module")
def clustered_vectors():
    """500 random directions and 300 noisy copies of some of them (several copies of one original)."""
    rng = np.random.default_rng(0)
    originals = rng.normal(size=(500, 12))
    copies = originals[rng.integers(0, 500, size=300)] + 0.15 * rng.normal(size=(300, 12))
    vectors = np.concatenate([originals, copies])[rng.permutation(800)].astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.parametrize("earlier_only", [True, False])
def test_similar_pairs_exact_path_equals_brute_force(clustered_vectors, earlier_only):
    rows, others, scores = embeddings.similar_pairs(clustered_vectors, threshold=0.95, k=2, earlier_only=earlier_only)
    expected = _pairs_by_brute_force(clustered_vectors, 0.95, 2, earlier_only)
    assert len(expected) > 100  # the planted copies make many pairs, and some rows more than k
    assert list(zip(rows.tolist(), others.tolist())) == expected
    assert np.allclose(scores, [clustered_vectors[i] @ clustered_vectors[j] for i, j in expected], atol=1e-5)


def test_similar_pairs_inverted_file_join(clustered_vectors):
    """Above ivf_min_records: probing every cell is exact; the default probes find nearly every pair."""
    expected = _pairs_by_brute_force(clustered_vectors, 0.95, 2, True)
    nlist = int(2 * np.sqrt(len(clustered_vectors)))
    rows, others, _ = embeddings.similar_pairs(clustered_vectors, threshold=0.95, k=2, ivf_min_records=100, nprobe=nlist)
    assert list(zip(rows.tolist(), others.tolist())) == expected
    rows, others, _ = embeddings.similar_pairs(clustered_vectors, threshold=0.95, k=2, ivf_min_records=100, nprobe=8)
    found = set(zip(rows.tolist(), others.tolist()))
    assert all(j < i and clustered_vectors[i] @ clustered_vectors[j] >= 0.95 - 1e-6 for i, j in found)
    assert len(found & set(expected)) >= 0.95 * len(expected)
