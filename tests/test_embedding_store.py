"""The run's embedding store (sandlab.embeddings.EmbeddingStore): a problem is embedded once per model
across dedup, decontamination, novelty, diversity and resumes; what it returns is what the model gives."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from sandlab import embeddings, models
from sandlab.errors import ConfigError
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


def test_models_are_kept_apart_and_a_rebuilt_model_is_another_model(tmp_path, encoded, static_model):
    store = embeddings.EmbeddingStore(tmp_path / "store")
    seen = []
    store.embed(PROBLEMS[:2], STATIC, lambda texts: embeddings.embed(texts, model=STATIC))
    minilm = "embedded://all-minilm-l6-v2"  # its files, not its vectors: compute is a stand-in
    other = store.embed(PROBLEMS[:2], minilm, lambda texts: seen.append(texts) or np.eye(2, 3, dtype=np.float32))
    assert seen == [PROBLEMS[:2]]  # nothing of the first model's reused for the second
    np.testing.assert_array_equal(other, np.eye(2, 3))
    assert len({p.parent for p in (tmp_path / "store").rglob("part-*.keys.npy")}) == 2
    # The same name over other weights (a rebuilt model, an updated checkpoint): embedded again.
    local = tmp_path / "model"
    shutil.copytree(static_model, local)
    store.embed(PROBLEMS[:2], str(local), lambda texts: embeddings.embed(texts, model=str(local)))
    encoded.clear()
    store.embed(PROBLEMS[:2], str(local), lambda texts: embeddings.embed(texts, model=str(local)))
    assert encoded == []
    weights = max((f for f in local.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    embeddings.model_identity.cache_clear()  # as a new process would see it
    embeddings._load_static.cache_clear()
    store.embed(PROBLEMS[:2], str(local), lambda texts: embeddings.embed(texts, model=str(local)))
    assert encoded == [PROBLEMS[:2]]


def test_a_part_cut_short_or_damaged_is_embedded_again(tmp_path, encoded, caplog):
    store = tmp_path / "embeddings"
    for at in range(5):
        embeddings.embed(PROBLEMS[at : at + 1], model=STATIC, store=store)
    keys = sorted(store.rglob("part-*.keys.npy"))
    assert len(keys) == 5
    vectors_of = lambda k: k.with_name(k.name.replace(".keys.npy", ".vectors.npy"))  # noqa: E731
    keys[0].unlink()  # killed between writing the vectors and the keys: the part does not count
    keys[1].write_bytes(b"")  # a crash left the name with nothing behind it
    keys[2].write_bytes(b"not a numpy file")
    np.save(vectors_of(keys[3]), np.zeros((2, 7), dtype=np.float32))  # rows that are not the keys'
    encoded.clear()
    with caplog.at_level(logging.WARNING, logger="sandlab.embeddings"):
        vectors = embeddings.embed(PROBLEMS, model=STATIC, store=store)
    assert encoded == [PROBLEMS[:4]]  # only the last part is whole
    warned = " ".join(r.message for r in caplog.records if "ignoring" in r.message)
    assert all(k.name in warned for k in keys[1:4]) and "1 keys for 2 vectors" in warned
    np.testing.assert_allclose(vectors, reference(PROBLEMS), atol=1e-6)


def test_vectors_of_another_width_under_the_same_model_stop_with_one_line(tmp_path, encoded):
    store = embeddings.EmbeddingStore(tmp_path)
    store.add(STATIC, store.digests(PROBLEMS[:1]), np.ones((1, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="holds 3-d vectors but .* gives 256-d ones; delete that folder"):
        store.embed(PROBLEMS[:2], STATIC, lambda texts: embeddings.embed(texts, model=STATIC))


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
