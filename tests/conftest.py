"""Shared pytest fixtures. Everything runs offline (no Hugging Face Hub) on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
_SHARED_BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks")
if os.path.isdir(_SHARED_BENCHMARKS):
    os.environ.setdefault("SANDLAB_BENCHMARK_DIR", os.path.abspath(_SHARED_BENCHMARKS))
elif os.environ.get("CI") and not os.environ.get("SANDLAB_BENCHMARK_DIR"):
    # In CI the benchmark-dependent tests must run, not skip.
    raise RuntimeError(f"CI needs the offline benchmarks at {os.path.abspath(_SHARED_BENCHMARKS)} or SANDLAB_BENCHMARK_DIR")

import collections  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402

SERVER_START_TIMEOUT_S = 240


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The tiny random Llama (SmolLM2 tokenizer + ChatML template), built once into the cache."""
    from sandlab.models import prepare_tiny_model

    return Path(prepare_tiny_model())


@pytest.fixture(scope="session")
def vllm_server(tiny_model_path):
    """A real vLLM OpenAI-compatible server on the tiny model, served as ``tiny``; yields its base URL."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_path),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", "1024",
        "--served-model-name", "tiny",
        "--enforce-eager",  # no torch.compile: starts in ~40 s instead of ~90 s on 2 cores
    ]  # fmt: skip
    # As sandlab's in-process engine does on a small machine: no core reserved for the scheduler.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")
    from sandlab.inference.cpu_settings import FEW_CORES

    if len(os.sched_getaffinity(0)) <= FEW_CORES:
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    tail: collections.deque[str] = collections.deque(maxlen=40)
    reader = threading.Thread(target=lambda: [tail.append(line.rstrip()) for line in proc.stdout], daemon=True)
    reader.start()
    base_url = f"http://127.0.0.1:{port}/v1"

    def stop() -> None:
        # The server runs in its own process group with its engine-core/worker children.
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            stop()
            pytest.fail(f"vLLM server exited with code {proc.returncode}:\n" + "\n".join(tail), pytrace=False)
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop()
            pytest.fail(
                f"vLLM server did not answer {base_url}/models within {SERVER_START_TIMEOUT_S} s:\n" + "\n".join(tail),
                pytrace=False,
            )
        time.sleep(1)
    print(f"\nvLLM server up at {base_url} after {time.monotonic() - started:.1f} s")
    try:
        yield base_url
    finally:
        stop()


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    rows = []
    for i in range(6):
        answer = 7 * i + 3
        rows.append({
            "id": f"fx-{i}",
            "prompt": [{"role": "user", "content": f"What is 7*{i}+3?"}],
            "completion": [{"role": "assistant", "content": f"7*{i} = {7 * i}; adding 3 gives {answer}. The final answer is \\boxed{{{answer}}}."}],
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Modules whose tests take longest (minutes on 2 cores): scheduled first under pytest-xdist, so the run
# does not end waiting on one of them started last.
LONGEST_MODULES = ("test_slurm", "test_pipeline", "test_train_distributed", "test_inference_backends", "test_score")


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs ``-n 2 --dist loadfile``: a module's tests stay on one
    worker, so its module- and session-scoped engines and servers start once, and the Slurm tests
    never share the local cluster), the longest modules come first. The workers collect; the
    controller hands out modules in the order they report."""
    if not hasattr(config, "workerinput"):
        return
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order inside a module kept
