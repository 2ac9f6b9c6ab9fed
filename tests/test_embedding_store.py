"""The run's embedding store (sandlab.embeddings.EmbeddingStore): a problem is embedded once per model
across dedup, decontamination, novelty, diversity and resumes; what it returns is what the model gives."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sandlab import embeddings, models
from sandlab.launch.cli import compose_recipe
from sandlab.launch.data_stages import apply_stage
from sandlab.runs import RunDir
from sandlab.stages import StageContext, get_stage, load_recipe

STATIC = "embedded://minilm-l6-static"
PROBLEMS = [
    "Let x and y be positive integers with x + y = 20. Find the largest possible value of xy.",
    "Let x and y be positive integers with x + y = 21. Find the largest possible value of xy.",
    "A ball is thrown upward from a cliff; describe the forces acting on it.",
    "How many primes are there below 100?",
    "Find the remainder when 2^100 is divided by 7.",
]


@pytest.fixture(scope="module", autouse=True)
def static_model() -> str:
    return models.resolve_model_path(STATIC)  # built by `make models` (cached), else built here (~40 s)


class _Forgetful(dict):
    """In place of the static model's in-process reuse of its last call: keeps nothing."""

    def __setitem__(self, key, value):
        pass


@pytest.fixture
def encoded(monkeypatch) -> list[list[str]]:
    """The texts each call of the static model encodes; with its in-process reuse of the last call off,
    only the store can spare a text from the model."""
    calls: list[list[str]] = []
    real = embeddings.encode_static
    monkeypatch.setattr(embeddings, "encode_static", lambda model, batch, **kw: calls.append(list(batch)) or real(model, batch, **kw))
    monkeypatch.setattr(embeddings, "_LAST_STATIC", _Forgetful())
    return calls


def reference(texts: list[str]) -> np.ndarray:
    """The model's own vectors, no store."""
    return embeddings.embed(texts, model=STATIC, progress=False)


def test_only_texts_the_store_lacks_are_embedded_and_the_vectors_are_the_models(tmp_path, encoded):
    store = tmp_path / "embeddings"
    first = embeddings.embed(PROBLEMS[:3], model=STATIC, store=store)
    assert encoded == [PROBLEMS[:3]]
    # A later call (another stage, or a resume in a new process: the store keeps nothing in memory)
    # with two known texts, a new one and the new one again: the model sees the new one once.
    later = [PROBLEMS[2], PROBLEMS[3], PROBLEMS[0], PROBLEMS[3]]
    again = embeddings.embed(later, model=STATIC, store=store)
    assert encoded == [PROBLEMS[:3], [PROBLEMS[3]]]
    np.testing.assert_allclose(again, reference(later), atol=1e-6)
    np.testing.assert_allclose(first, reference(PROBLEMS[:3]), atol=1e-6)
    assert again.dtype == np.float32 and again.shape == (4, first.shape[1])
    encoded.clear()
    embeddings.embed(later, model=STATIC, store=store)
    assert encoded == []


def test_models_are_kept_apart(tmp_path, encoded):
    store = embeddings.EmbeddingStore(tmp_path)
    seen = []
    store.embed(PROBLEMS[:2], STATIC, lambda texts: embeddings.embed(texts, model=STATIC))
    other = store.embed(PROBLEMS[:2], "another-model", lambda texts: seen.append(texts) or np.eye(2, 3, dtype=np.float32))
    assert seen == [PROBLEMS[:2]]  # nothing of the first model's reused for the second
    np.testing.assert_array_equal(other, np.eye(2, 3))
    assert len({p.parent for p in tmp_path.rglob("part-*.keys.npy")}) == 2


def test_a_part_cut_short_or_damaged_is_embedded_again(tmp_path, encoded, caplog):
    store = tmp_path / "embeddings"
    embeddings.embed(PROBLEMS[:2], model=STATIC, store=store)
    embeddings.embed(PROBLEMS[2:4], model=STATIC, store=store)
    keys = sorted(store.rglob("part-*.keys.npy"))
    assert len(keys) == 2
    keys[0].unlink()  # killed between writing the vectors and the keys: the part does not count
    keys[1].write_bytes(b"not a numpy file")
    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="sandlab.embeddings"):
        vectors = embeddings.embed(PROBLEMS[:4], model=STATIC, store=store)
    assert encoded == [PROBLEMS[:4]]
    assert any("ignoring" in r.message and keys[1].name in r.message for r in caplog.records)
    np.testing.assert_allclose(vectors, reference(PROBLEMS[:4]), atol=1e-6)


def test_diversity_after_dedup_embeds_nothing_again(tmp_path, encoded):
    cfg = load_recipe(compose_recipe("tiny", [f"run.dir={tmp_path / 'run'}", f"data.dedup.embedding_model={STATIC}",
                                              f"data.diversity.embedding_model={STATIC}", "data.dedup.minhash=false",
                                              "data.dedup.threshold=0.99", "data.diversity.max_per_leaf=null"]))
    ctx = StageContext(cfg, tmp_path, RunDir(tmp_path / "run"))
    records = [{"id": f"p{i}", "problem": p} for i, p in enumerate([*PROBLEMS, PROBLEMS[1]])]
    kept, dropped, _ = apply_stage(ctx, get_stage("dedup"), records)
    assert [d["reason"] for d in dropped] == ["exact_duplicate"]
    assert encoded == [PROBLEMS]
    kept, _, _ = apply_stage(ctx, get_stage("diversity"), kept[1:])  # what later stages kept
    assert encoded == [PROBLEMS]
    assert (ctx.data_dir / "diversity.json").exists()
    # Off: every stage embeds for itself, as before.
    off = StageContext(load_recipe(compose_recipe("tiny", [f"run.dir={tmp_path / 'off'}", "data.embedding_store=false"])), tmp_path, RunDir(tmp_path / "off"))
    assert off.embedding_store is None
