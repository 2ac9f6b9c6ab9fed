"""Real DeepSpeed ZeRO-3 with Ulysses sequence parallelism on 2 CPU processes (accelerate launch, gloo
all-to-all): SP=2 trains exactly like one process on the same batches (loss, gradient norm and weights);
a job killed with SIGKILL after a few sharded checkpoints resumes from the newest complete one and ends
with the same weights as an uninterrupted run; a sharded checkpoint consolidates into HF safetensors.
(ZeRO-3 data parallelism is killed and resumed under real Slurm in test_slurm.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("z3") / "train.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"What is 7*{i}+3?"}],
             "completion": [{"role": "assistant", "content": f"<think>7*{i} = {7 * i}</think> adding 3 gives {7 * i + 3}. \\boxed{{{7 * i + 3}}}"}]}
            for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command(run_dir, data, *overrides):
    return [sys.executable, "train/sft.py", "--config-name", "tiny", "train=cpu_sp2", f"data.dataset_path={data}", f"train.trl.max_steps={STEPS}",
            "train.trl.learning_rate=1e-3", f"run.dir={run_dir}", "wandb.mode=disabled", *overrides]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def kill_tree(proc):
    """SIGKILL the launcher and every descendant, as Slurm does to a job's cgroup (torchrun starts its
    workers in sessions of their own, so killing the process group is not enough)."""
    import psutil

    family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in family[1:]) and time.monotonic() < deadline:
        time.sleep(0.1)


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def whole_run(sft_data, tmp_path_factory):
    """An uninterrupted SP=2 ZeRO-3 run (a checkpoint every step)."""
    run_dir = tmp_path_factory.mktemp("sp2") / "whole"
    whole = subprocess.run(command(run_dir, sft_data), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return run_dir


def metrics(run_dir):
    return json.loads((run_dir / "checkpoints/final/train_metrics.json").read_text())["history"]


@pytest.mark.slow
def test_sequence_parallel_trains_like_one_process(sft_data, whole_run, tmp_path):
    """SP=2 over 2 processes against 1 process without SP on the same batches (each row padded to 256 tokens,
    as SP on gloo pads them): the loss of every step, the first step's gradient norm, the final weights."""
    single = tmp_path / "single"
    one = subprocess.run(command(single, sft_data, "train=cpu_demo", "train.per_device_train_batch_size=1", "train.global_batch_size=1",
                                 "+train.trl.pad_to_multiple_of=256"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    sp, ref = metrics(whole_run), metrics(single)
    assert [e["step"] for e in sp] == [e["step"] for e in ref] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in sp] == pytest.approx([e["loss"] for e in ref], rel=1e-5)
    assert sp[0]["grad_norm"] == pytest.approx(ref[0]["grad_norm"], rel=1e-4)
    assert [e["grad_norm"] for e in sp] == pytest.approx([e["grad_norm"] for e in ref], rel=2e-3)
    from sandlab.models import resolve_model_path

    start = weights(Path(resolve_model_path("embedded://tiny-random-llama")) / "model.safetensors")
    a, b = weights(whole_run / "checkpoints/final/model.safetensors"), weights(single / "checkpoints/final/model.safetensors")
    assert a.keys() == b.keys()
    moved = sum(float((b[k] - start[k]).norm() ** 2) for k in b) ** 0.5
    apart = sum(float((a[k] - b[k]).norm() ** 2) for k in b) ** 0.5
    assert moved > 0.1 and apart < 1e-3 * moved, (moved, apart)  # training moved the weights; SP and no SP moved them alike


@pytest.mark.slow
def test_zero3_sp_sigkill_resume_matches_uninterrupted_run_and_consolidates(sft_data, whole_run, tmp_path):
    import torch

    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed, sft_data), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints/final/checkpoint-3/trainer_state.json"
    deadline = time.monotonic() + 400
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_tree(proc)
    assert marker.exists() and not (killed / "stages/train.done").exists() and not (killed / "checkpoints/final/model.safetensors").exists()

    rerun = subprocess.run(command(killed, sft_data), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed_from = [line for line in (rerun.stdout + rerun.stderr).splitlines() if "resuming from" in line]
    assert resumed_from and "checkpoint-" in resumed_from[0], (rerun.stdout + rerun.stderr)[-4000:]
    state = json.loads((killed / f"checkpoints/final/checkpoint-{STEPS}/trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == list(range(1, STEPS + 1))  # no step lost or repeated

    final_whole, final_resumed = weights(whole_run / "checkpoints/final/model.safetensors"), weights(killed / "checkpoints/final/model.safetensors")
    assert final_whole.keys() == final_resumed.keys()
    for name in final_whole:
        torch.testing.assert_close(final_resumed[name], final_whole[name], rtol=1e-4, atol=1e-5, msg=name)

    out = tmp_path / "consolidated"
    result = subprocess.run([sys.executable, "train/consolidate.py", str(killed / f"checkpoints/final/checkpoint-{STEPS}"), str(out), "--dtype", "float32"],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    consolidated = {}
    for shard in sorted(out.glob("*.safetensors")):
        consolidated |= weights(shard)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # loads as a plain HF checkpoint
    assert model.config.vocab_size > 0 and (out / "tokenizer.json").exists()
    for name, tensor in final_resumed.items():
        torch.testing.assert_close(consolidated[name].to(tensor.dtype), tensor, msg=name)

    not_a_checkpoint = subprocess.run([sys.executable, "train/consolidate.py", str(tmp_path), str(tmp_path / "x")], cwd=ROOT, env=ENV,
                                      capture_output=True, text=True, timeout=120)
    assert not_a_checkpoint.returncode == 2 and "is not a DeepSpeed ZeRO checkpoint" in not_a_checkpoint.stderr
