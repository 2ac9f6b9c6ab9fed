"""The OpenAI-compatible client: against a real vLLM server (tiny model) and against scripted stubs."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import free_port

from sandlab.errors import BackendUnavailableError
from sandlab.inference.base import SamplingConfig
from sandlab.inference.openai_client import OpenAICompatibleBackend

pytestmark = pytest.mark.timeout(300)

CONVS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}],
    [{"role": "user", "content": "Tell me a story about a fox."}],
]
PREFILLED = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is"}]
SECRET = "sk-test-DO-NOT-LEAK-4f9a1c"


def _fast(backend_kwargs: dict | None = None) -> dict:
    return {"max_retries": 3, "retry_backoff_s": 0.01, "timeout_s": 10, **(backend_kwargs or {})}


# --- a scripted OpenAI-compatible stub server --------------------------------------------------
def _completion_body(text: str = "hello", n: int = 1) -> dict:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "model": "stub",
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": f"{text} {i}"}, "finish_reason": "stop"}
            for i in range(n)
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3 * n, "total_tokens": 7 + 3 * n},
    }


class StubServer:
    """Answers POST /chat/completions from a script of (status, headers, body); GET /models with 200."""

    def __init__(self, script: list[tuple[int, dict, dict]] | None = None, default=(200, {}, None)):
        self.script = list(script or [])
        self.default = default
        self.requests: list[dict] = []  # {"path", "headers", "body"} of every POST
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _send(self, status: int, headers: dict, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send(200, {}, {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "me"}]})

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with stub.lock:
                    stub.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status, headers, reply = stub.script.pop(0) if stub.script else stub.default
                if reply is None:
                    reply = _completion_body(n=body.get("n", 1))
                self._send(status, headers, reply)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- against the real vLLM server ------------------------------------------------------------
def test_n_samples_token_counts_and_length(vllm_server):
    backend = OpenAICompatibleBackend("tiny", [vllm_server], **_fast())
    out = backend.generate(CONVS, SamplingConfig(n=3, temperature=1.0, max_tokens=8, seed=0))
    assert [len(row) for row in out] == [3, 3, 3]
    for row in out:
        assert len({c.text for c in row}) == 3
        for c in row:
            assert c.ok and c.finish_reason == "length"
            assert c.completion_tokens == 8 and c.prompt_tokens > 10


def test_prompt_tokens_match_the_chat_template(vllm_server, tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    backend = OpenAICompatibleBackend("tiny", [vllm_server], **_fast())
    out = backend.generate([CONVS[1], PREFILLED], SamplingConfig(n=1, temperature=0.0, max_tokens=4))
    plain = tok.apply_chat_template(CONVS[1], tokenize=True, add_generation_prompt=True, return_dict=False)
    prefill = tok.apply_chat_template(PREFILLED, tokenize=True, continue_final_message=True, return_dict=False)
    assert out[0][0].prompt_tokens == len(plain)
    assert out[1][0].prompt_tokens == len(prefill)  # continued, not a new assistant turn


def test_seed_and_stop(vllm_server):
    backend = OpenAICompatibleBackend("tiny", [vllm_server], **_fast())
    sampling = SamplingConfig(n=1, temperature=1.0, max_tokens=24, seed=7)
    full = backend.generate(CONVS[:1], sampling)[0][0].text
    assert backend.generate(CONVS[:1], sampling)[0][0].text == full  # same seed, same text
    words = full.split()
    assert len(words) >= 4, full
    sampling.stop = [words[2]]
    cut = backend.generate(CONVS[:1], sampling)[0][0]
    assert cut.finish_reason == "stop" and words[2] not in cut.text
    assert cut.text == full[: full.index(words[2])]
    assert 0 < cut.completion_tokens < 24  # exact per-choice count (vLLM token ids)


def test_concurrency_and_round_robin_over_two_urls(vllm_server):
    backend = OpenAICompatibleBackend("tiny", [vllm_server, vllm_server + "/"], max_concurrency=4, **_fast())
    convs = [[{"role": "user", "content": f"Question number {i}?"}] for i in range(12)]
    out = backend.generate(convs, SamplingConfig(n=2, temperature=0.8, max_tokens=6, seed=1))
    assert len(out) == 12 and all(len(row) == 2 and all(c.ok for c in row) for row in out)
    assert backend._is_vllm  # the /models probe recognised vLLM (exact per-choice token counts)


def test_generate_inside_a_running_event_loop(vllm_server):
    backend = OpenAICompatibleBackend("tiny", [vllm_server], **_fast())

    async def main():
        return backend.generate(CONVS[:1], SamplingConfig(max_tokens=3))

    out = asyncio.run(main())
    assert out[0][0].ok and out[0][0].completion_tokens == 3


def test_wrong_served_model_name_is_one_clear_line(vllm_server):
    backend = OpenAICompatibleBackend("not-served", [vllm_server], **_fast())
    with pytest.raises(BackendUnavailableError) as info:
        backend.generate(CONVS[:1], SamplingConfig(max_tokens=3))
    assert "\n" not in str(info.value) and "not-served" in str(info.value) and "tiny" in str(info.value)


# --- failure handling against stubs -----------------------------------------------------------
def test_server_down_fails_fast_with_one_line():
    url = f"http://127.0.0.1:{free_port()}/v1"
    backend = OpenAICompatibleBackend("tiny", [url], **_fast())
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        backend.check_health()
    message = str(info.value)
    assert message == f"teacher server {url} is unreachable (ConnectError); start it or fix base_urls"
    with pytest.raises(BackendUnavailableError):
        backend.generate(CONVS[:1], SamplingConfig(max_tokens=3))  # lazily checked at the first generate
    assert time.monotonic() - start < 10


def test_one_of_two_servers_down_uses_the_other():
    with StubServer() as stub:
        down = f"http://127.0.0.1:{free_port()}/v1"
        backend = OpenAICompatibleBackend("stub", [down, stub.url], **_fast())
        assert backend.check_health() == [stub.url]
        out = backend.generate(CONVS, SamplingConfig(max_tokens=3))
        assert all(row[0].ok for row in out) and len(stub.requests) == 3


def test_retries_429_then_503_then_succeeds_honouring_retry_after():
    script = [(429, {"Retry-After": "1"}, {"error": "slow down"}), (503, {}, {"error": "busy"})]
    with StubServer(script) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **_fast())
        start = time.monotonic()
        out = backend.generate(CONVS[:1], SamplingConfig(max_tokens=3))
        elapsed = time.monotonic() - start
    assert len(stub.requests) == 3
    assert out[0][0].ok and out[0][0].text == "hello 0" and out[0][0].prompt_tokens == 7
    assert elapsed >= 1.0  # waited for Retry-After, not just the 0.01 s backoff


def test_400_is_not_retried_and_becomes_an_error_completion():
    with StubServer([(400, {}, {"error": {"message": "bad request: max_tokens too large"}})]) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **_fast())
        out = backend.generate(CONVS[:2], SamplingConfig(n=2, temperature=1.0, max_tokens=3))
    assert len(stub.requests) == 2  # the failing one once, the other once
    failed = [row for row in out if not row[0].ok]
    assert len(failed) == 1 and len(failed[0]) == 2
    assert all(c.finish_reason == "error" and "HTTP 400" in c.error and "max_tokens too large" in c.error for c in failed[0])


def test_persistent_5xx_gives_up_after_max_retries():
    with StubServer(default=(500, {}, {"error": "boom"})) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], max_retries=2, retry_backoff_s=0.01, timeout_s=5)
        out = backend.generate(CONVS[:1], SamplingConfig(max_tokens=3))
    assert len(stub.requests) == 3
    assert out[0][0].finish_reason == "error" and "3 attempts" in out[0][0].error


def test_fewer_choices_than_n_are_filled_up():
    with StubServer([(200, {}, _completion_body("part", n=1))]) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **_fast())
        out = backend.generate(CONVS[:1], SamplingConfig(n=3, temperature=1.0, max_tokens=3, seed=5))
    assert [c.text for c in out[0]] == ["part 0", "hello 0", "hello 1"]
    assert [r["body"]["n"] for r in stub.requests] == [3, 2]
    assert [r["body"]["seed"] for r in stub.requests] == [5, 6]  # refills do not repeat the first samples


def test_round_robin_alternates_servers():
    with StubServer() as a, StubServer() as b:
        backend = OpenAICompatibleBackend("stub", [a.url, b.url], max_concurrency=1, **_fast())
        backend.generate([CONVS[0]] * 4, SamplingConfig(max_tokens=3))
    assert len(a.requests) == 2 and len(b.requests) == 2


def test_request_fields_and_prefill_extras():
    with StubServer() as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **_fast())
        backend.generate(
            [CONVS[0], PREFILLED], SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_tokens=5, seed=3, stop=["###"])
        )
    bodies = sorted((r["body"] for r in stub.requests), key=lambda b: len(b["messages"]))
    plain, prefill = bodies
    for index, body in enumerate(bodies):  # conversation i is sampled with seed + i
        assert body["model"] == "stub"
        assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"], body["seed"], body["stop"]) == (
            2, 0.7, 0.9, 5, 3 + index, ["###"],
        )  # fmt: skip
        assert "return_token_ids" not in body  # not a vLLM server: only standard fields
    assert "continue_final_message" not in plain and "add_generation_prompt" not in plain
    assert prefill["continue_final_message"] is True and prefill["add_generation_prompt"] is False


def test_api_key_never_leaks(monkeypatch, caplog):
    monkeypatch.setenv("SANDLAB_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)  # includes httpx/httpcore debug records
    script = [(503, {}, {"error": "busy"}), (401, {}, {"error": {"message": f"invalid key {SECRET}"}})]
    with StubServer(script) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], api_key_env="SANDLAB_TEST_KEY", **_fast())
        out = backend.generate(CONVS[:1], SamplingConfig(max_tokens=3))
    # The key is sent to the server ...
    assert stub.requests[0]["headers"].get("Authorization") == f"Bearer {SECRET}"
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


def test_server_down_after_health_check_retries_then_records_failed_items():
    """Connection errors mid-run are retried with backoff, then become error items; the run goes on."""
    stub = StubServer().__enter__()
    backend = OpenAICompatibleBackend("stub", [stub.url], **_fast({"max_retries": 2, "retry_backoff_s": 0.05}))
    assert backend.check_health() == [stub.url]
    backend.generate(CONVS[:1], SamplingConfig(max_tokens=3))  # warm: the health check has passed
    stub.__exit__()  # the server goes away
    start = time.monotonic()
    out = backend.generate(CONVS[:2], SamplingConfig(n=2, max_tokens=3))
    elapsed = time.monotonic() - start
    assert [len(r) for r in out] == [2, 2]
    assert all(c.finish_reason == "error" and "Connect" in (c.error or "") for r in out for c in r)
    assert 0.05 <= elapsed < 10  # backed off at least once, never hung


def test_reasoning_parser_output_is_rejoined_in_think_tags():
    body = _completion_body()
    body["choices"][0]["message"] = {"role": "assistant", "content": "The answer is \\boxed{4}.", "reasoning_content": "2+2=4"}
    with StubServer(default=(200, {}, body)) as stub:
        backend = OpenAICompatibleBackend("stub", [stub.url], **_fast())
        (completion,), = backend.generate(CONVS[:1], SamplingConfig(max_tokens=3))
    assert completion.text == "<think>\n2+2=4\n</think>\n\nThe answer is \\boxed{4}."
