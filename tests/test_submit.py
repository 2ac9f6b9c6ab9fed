"""sandlab-submit without a cluster: which jobs a recipe becomes, the rendered scripts (bash syntax,
dependencies, multi-node launch), the GPU-hour estimate against an independent count, endpoints files
and one-line errors. The same scripts run on a real Slurm in test_slurm.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from sandlab.errors import BackendUnavailableError
from sandlab.inference.endpoints import wait_for_endpoints

ROOT = Path(__file__).resolve().parents[1]


def submit(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sandlab.launch.submit", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def split_scripts(stdout: str) -> dict[str, tuple[str, str]]:
    """job name -> (sbatch command, rendered script) from a dry run's output."""
    jobs = {}
    for block in re.split(r"^# ---- job \d+: ", stdout, flags=re.MULTILINE)[1:]:
        name = block.split(" ", 1)[0]
        lines = block.splitlines()
        command = lines[1].removeprefix("# $ ")
        script = []
        for line in lines[2:]:
            if line.startswith(("# ---- ", "GPU-hour estimate")):
                break
            script.append(line)
        jobs[name] = (command, "\n".join(script))
    return jobs


@pytest.fixture(scope="module")
def paper_dry_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("paper") / "run"
    result = submit("--config-name", "sand_math_qwen2.5_32b", "--dry-run", "cluster=example_h100", f"run.dir={run_dir}",
                    "launcher.serve.enabled=true", "teacher=vllm_tp8", "data.partition.count=4",
                    "launcher.train.nodes=2", "train.per_device_train_batch_size=1")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, run_dir


def test_paper_recipe_becomes_dependent_jobs(paper_dry_run):
    result, run_dir = paper_dry_run
    jobs = split_scripts(result.stdout)
    name = "sand_math_qwen2.5_32b"
    assert list(jobs) == [f"{name}-{kind}" for kind in ("serve", "data-array", "data", "train", "eval", "stop-serve")]
    command = {k.removeprefix(f"{name}-"): v[0] for k, v in jobs.items()}
    assert "--dependency" not in command["serve"]
    assert f"--dependency=after:<{name}-serve> --kill-on-invalid-dep=yes --array=0-3" in command["data-array"]
    assert f"--dependency=afterok:<{name}-data-array>,after:<{name}-serve>" in command["data"]
    assert f"--dependency=afterok:<{name}-data>" in command["train"] and f"--dependency=afterok:<{name}-train>" in command["eval"]
    assert f"--dependency=afterany:<{name}-data>" in command["stop-serve"] and "--wrap" in command["stop-serve"]
    # Nothing is written by a dry run.
    assert not run_dir.exists()
    assert "training on 2 node(s): train.num_processes=16 train.gradient_accumulation_steps=1" in result.stderr


def test_rendered_scripts_are_valid_bash_with_cluster_settings(paper_dry_run, tmp_path):
    jobs = split_scripts(paper_dry_run[0].stdout)
    for name, (_, script) in jobs.items():
        if not script.strip():
            continue  # the cleanup job is an --wrap one-liner
        path = tmp_path / f"{name}.sbatch"
        path.write_text(script)
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, f"{name}: {check.stderr}"
        assert script.startswith("#!/bin/bash") and "#SBATCH --partition=gpu" in script
        assert ("#SBATCH --mem=0" in script) == ("-data" not in name)  # data jobs only send requests here
        assert "export NCCL_ASYNC_ERROR_HANDLING=1" in script  # cluster.setup
    train = jobs["sand_math_qwen2.5_32b-train"][1]
    assert "#SBATCH --nodes=2" in train and "#SBATCH --gpus-per-node=8" in train and "#SBATCH --requeue" in train
    assert "#SBATCH --signal=B:USR1@300" in train and 'scontrol requeue "${SLURM_JOB_ID}"' in train
    assert '--num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" --num_processes 16' in train
    assert '--main_process_ip "$HEAD_NODE"' in train and "--rdzv_backend c10d" in train and "train/sft.py" in train
    assert "train.num_processes=16" in train and "'run.only=[train]'" in train
    data = jobs["sand_math_qwen2.5_32b-data"][1]
    # The teacher runs in the serve job; data jobs are clients: no GPUs, a few CPUs, no whole-node --mem.
    assert "#SBATCH --gpus-per-node" not in data and "#SBATCH --cpus-per-task=8" in data and "#SBATCH --mem" not in data
    assert "teacher.backend=openai" in data and "teacher.endpoints_file=" in data
    serve = jobs["sand_math_qwen2.5_32b-serve"][1]
    assert "vllm.entrypoints.openai.api_server" in serve and "--tensor-parallel-size 8" in serve and "--served-model-name Qwen/Qwen3-235B-A22B" in serve
    assert '"data.partition.index=${SLURM_ARRAY_TASK_ID}"' in jobs["sand_math_qwen2.5_32b-data-array"][1]


def test_multi_node_accelerate_config(paper_dry_run):
    out = paper_dry_run[0].stdout
    text = out.rsplit("accelerate_train.yaml\n", 1)[1].split("GPU-hour estimate")[0]  # printed after the scripts
    acc = yaml.safe_load(text)
    assert acc["num_machines"] == 2 and acc["num_processes"] == 16
    assert acc["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"  # torchrun per node, no pdsh
    assert Path(acc["deepspeed_config"]["deepspeed_config_file"]).is_absolute()


def test_gpu_hour_estimate_matches_an_independent_count(paper_dry_run):
    out = paper_dry_run[0].stdout
    cfg = yaml.safe_load((ROOT / "recipes/data/sand_math.yaml").read_text())
    train_cfg = yaml.safe_load((ROOT / "recipes/train/paper_32b.yaml").read_text())
    # 6 N FLOPs per trained token, N = 32.5e9 (model group), ~num_problems x 0.3 kept x 8000 tokens x epochs,
    # 40% of 989.4 TFLOP/s (H100 SXM).
    tokens = cfg["generate"]["num_problems"] * 0.3 * 8000 * train_cfg["trl"]["num_train_epochs"]
    hours = tokens * 6 * 32.5e9 / (0.40 * 989.4e12) / 3600
    line = next(line for line in out.splitlines() if line.startswith("train "))
    assert float(line.split()[4].replace(",", "")) == pytest.approx(hours, rel=1e-3)
    assert "989.4 peak TFLOP/s" in out and re.search(r"^total\s+[\d,.]+$", out, re.MULTILINE)


def test_passrate_keeps_gpus_when_the_teacher_is_served(tmp_path):
    # The GRPO recipe's 16 x 33k-token micro-batch does not fit an 80 GB GPU; the memory plan's fix does.
    fits = ["rl.per_device_train_batch_size=1", "rl.gradient_accumulation_steps=64", "rl.accelerate_config=accelerate_configs/zero3_offload_optimizer.yaml"]
    result = submit("--config-name", "grpo_sand_math_qwen2.5_32b", "--dry-run", "cluster=example_h100", "teacher=vllm_tp8",
                    "launcher.serve.enabled=true", "rl.init_from=/", f"run.dir={tmp_path / 'r'}", *fits)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = split_scripts(result.stdout)
    name = "grpo_sand_math_qwen2.5_32b"
    assert list(jobs) == [f"{name}-{kind}" for kind in ("serve", "data", "grpo", "eval", "stop-serve")]
    data = jobs[f"{name}-data"][1]
    assert "'run.only=[generate,passrate]'" in data and "#SBATCH --gpus-per-node=8" in data  # the student runs in vLLM here
    assert "train/grpo.py" in jobs[f"{name}-grpo"][1] and "data (passrate)" in result.stdout


@pytest.mark.slow
def test_submit_errors_are_one_line(tmp_path):
    bad_nodes = submit("--config-name", "sand_math_qwen2.5_32b", "--dry-run", "cluster=example_h100", "launcher.train.nodes=3")
    assert bad_nodes.returncode == 2
    assert bad_nodes.stderr.strip().splitlines()[-1].startswith("error: train.global_batch_size=16 is not a multiple of")
    unknown = submit("--config-name", "demo", "--dry-run", "cluster=nowhere")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1 and "cluster" in unknown.stderr
    secret = submit("--config-name", "demo", "--dry-run", "+train.trl.hub_token=hf_123")
    assert secret.returncode == 2 and "hf_123" not in secret.stdout + secret.stderr
    assert secret.stderr.strip().splitlines()[-1].startswith("error: +train.trl.hub_token looks like a secret")
    in_cluster = submit("--config-name", "demo", "--dry-run", "+cluster.env.HF_TOKEN=hf_abc")
    assert in_cluster.returncode == 2 and "hf_abc" not in in_cluster.stdout + in_cluster.stderr and "looks like a secret" in in_cluster.stderr
    no_data = submit("--config-name", "sand_math_r1_distill_qwen_32b", "--dry-run", f"run.dir={tmp_path / 'empty'}")
    assert no_data.returncode == 2 and "trains on an existing SFT dataset" in no_data.stderr.strip().splitlines()[-1]
    no_sbatch = submit("--config-name", "demo", f"run.dir={tmp_path / 'r'}", env_extra={"PATH": str(Path(sys.executable).parent)})
    assert no_sbatch.returncode == 2
    assert no_sbatch.stderr.strip().splitlines()[-1] == "error: sbatch not found: submit from a Slurm login node (or use --dry-run to see the scripts)"


def test_gpt_oss_teacher_dry_runs_as_amd_served_it(tmp_path):
    """AMD's vLLM serve flags for gpt-oss-120b come from the teacher config; the data job keeps
    reasoning_effort high (teacher.extra_body) and temperature 1.0 for its requests."""
    result = submit("--config-name", "sand_math_gpt_oss_teacher", "--dry-run", "cluster=example_mi300x", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = split_scripts(result.stdout)
    serve = jobs["sand_math_gpt_oss_teacher-serve"][1]
    for flag in ("--model openai/gpt-oss-120b", "--tensor-parallel-size 8", "--max-num-seqs 4096", "--max-model-len 52072",
                 "--max-num-batched-tokens 65536", "--no-enable-prefix-caching"):
        assert flag in serve, flag
    assert "teacher.backend=openai" in jobs["sand_math_gpt_oss_teacher-data"][1]
    from test_recipes import compose_recipe

    from sandlab.stages import load_recipe

    recipe = load_recipe(compose_recipe("sand_math_gpt_oss_teacher", ["run.dir=runs/x"]))
    assert recipe.teacher.extra_body == {"reasoning_effort": "high"}
    assert recipe.data.generate.sampling.temperature == recipe.data.solve.sampling.temperature == 1.0


@pytest.mark.slow
def test_demo_on_the_local_cluster_runs_cpu_training_without_accelerate(tmp_path):
    result = submit("--config-name", "demo", "--dry-run", f"run.dir={tmp_path / 'r'}")
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = split_scripts(result.stdout)
    assert list(jobs) == ["demo-data", "demo-train", "demo-eval"]
    assert "#SBATCH --partition=local" in jobs["demo-train"][1] and "--gpus-per-node" not in result.stdout
    assert "accelerate.commands.launch" not in jobs["demo-train"][1]  # one CPU process: no launcher needed
    zero3 = split_scripts(submit("--config-name", "demo", "--dry-run", "train=cpu_zero3", f"run.dir={tmp_path / 'r'}").stdout)
    assert "accelerate.commands.launch" in zero3["demo-train"][1] and "--num_processes 2" in zero3["demo-train"][1]


def test_endpoints_file_is_waited_for(tmp_path):
    path = tmp_path / "endpoints" / "teacher.txt"

    def servers_come_up():
        time.sleep(0.5)
        path.parent.mkdir(parents=True)
        path.write_text("http://node1:8000/v1\n")
        time.sleep(0.5)
        with path.open("a") as f:
            f.write("http://node2:8000/v1\nnot a url\n")

    writer = threading.Thread(target=servers_come_up)
    writer.start()
    try:
        assert wait_for_endpoints(path, count=2, wait_s=30, poll_s=0.1) == ["http://node1:8000/v1", "http://node2:8000/v1"]
    finally:
        writer.join()
    with pytest.raises(BackendUnavailableError, match=r"2 of 3 teacher endpoint\(s\) in .* after 0 s"):
        wait_for_endpoints(path, count=3, wait_s=0.3, poll_s=0.1)


@pytest.mark.parametrize("recipe, configs", [("sand_math_qwen2.5_32b_released", ["math"]),
                                             ("sand_mathscience_r1_distill_qwen_32b_released", ["math", "science", "math_dh"])])
def test_released_data_recipes_submit_train_and_eval_only(tmp_path, recipe, configs):
    """Tables 1-2 from AMD's released data: no data or teacher jobs; the job reads the Hub dataset's configs."""
    result = submit("--config-name", recipe, "--dry-run", "cluster=example_mi300x", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = split_scripts(result.stdout)
    assert sorted(jobs) == sorted([f"{recipe}-train", f"{recipe}-eval"])
    from sandlab.launch.cli import compose_recipe
    from sandlab.stages import load_recipe

    data = load_recipe(compose_recipe(recipe, [f"run.dir={tmp_path / 'run'}"])).data
    assert (data.dataset_path, str(data.format)) == ("amd/SAND-Post-Training-Dataset", "sand_post_training")
    assert [data.config, *(e["config"] for e in data.mix)] == configs
    assert re.search(r"^train .*examples \(launcher\.cost\.train_examples\)", result.stdout, re.MULTILINE)


def test_a_job_that_does_not_fit_stops_the_submission_with_a_fix(tmp_path):
    """The paper recipe on 8x H100 80 GB: the dry run prints the plan and stops with one line naming a change
    that fits; with that change the same dry run passes and prints the plan of the fitting job."""
    result = submit("--config-name", "sand_math_qwen2.5_32b", "--dry-run", "cluster=example_h100", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert re.search(r"^  train: [\d.]+ GiB of 71.3 GiB DOES NOT FIT", result.stdout, re.MULTILINE), result.stdout[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the train job needs ") and "GiB per GPU, over the 71.3 GiB budget of example_h100's GPUs; fits with" in error
    fix = error.split(": ")[-1].split()
    fixed = submit("--config-name", "sand_math_qwen2.5_32b", "--dry-run", "cluster=example_h100", f"run.dir={tmp_path / 'run'}", *fix)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert re.search(r"^  train: [\d.]+ GiB of 71.3 GiB fits", fixed.stdout, re.MULTILINE)
    assert "#SBATCH" in fixed.stdout and not (tmp_path / "run" / "memory_plan.json").exists()  # a dry run writes nothing


def test_h100_recipe_launches_ulysses_through_accelerate(tmp_path):
    """The _h100 recipe's train job: accelerate's ParallelismConfig for DeepSpeed Ulysses (SP 4 x 2 data-parallel
    groups on 8 GPUs) and the optimizer-offload ZeRO-3 config, with the plan saying it fits."""
    result = submit("--config-name", "sand_math_qwen2.5_32b_h100", "--dry-run", f"run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    acc = yaml.safe_load(result.stdout.rsplit("accelerate_train.yaml\n", 1)[1].split("GPU-hour estimate")[0])
    assert acc["parallelism_config"] == {"parallelism_config_sp_backend": "deepspeed", "parallelism_config_sp_size": 4,
                                         "parallelism_config_dp_replicate_size": 2, "parallelism_config_sp_seq_length_is_variable": True,
                                         "parallelism_config_sp_attn_implementation": "flash_attention_2"}
    assert acc["deepspeed_config"]["deepspeed_config_file"].endswith("deepspeed/zero3_offload_optimizer.json")
    assert re.search(r"^  train: [\d.]+ GiB of 71.3 GiB fits", result.stdout, re.MULTILINE)
