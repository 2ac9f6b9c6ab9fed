"""The Slurm path on a real Slurm: the demo recipe's jobs from ``sandlab-submit`` (vLLM teacher server,
data array + merge, DeepSpeed ZeRO-3 training requeued midway, evaluation) and a two-point sweep
through Hydra's submitit launcher.

Needs a running cluster: ``sudo bash slurm/local_cluster.sh up`` (``.ci/run`` starts one and sets
SANDLAB_REQUIRE_SLURM=1, so there these tests fail rather than skip when it is missing).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from wandb_records import run_summary

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = Path(os.environ.get("SANDLAB_BENCHMARK_DIR", ROOT.parent / "shared" / "benchmarks"))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# Both tests run jobs on a real Slurm cluster and start vLLM in them (the teacher server, the eval engine).
pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.slow]


def cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm client (sinfo/sbatch) on PATH"
    result = subprocess.run(["sinfo", "-h", "-o", "%a %t"], capture_output=True, text=True, check=False, timeout=30)
    if result.returncode != 0:
        return f"sinfo failed: {result.stderr.strip()[:200]}"
    if not re.search(r"^up (idle|mix|alloc)", result.stdout, re.MULTILINE):
        return f"no partition is up with a usable node ({result.stdout.strip()[:200]!r})"
    return None


@pytest.fixture(scope="module")
def slurm_cluster():
    problem = cluster_problem()
    if problem:
        message = f"no Slurm cluster is up ({problem}); start one with `sudo bash slurm/local_cluster.sh up` (CI does)"
        if os.environ.get("SANDLAB_REQUIRE_SLURM") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def job_records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job`` of a job (one record per array task)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=False).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def wait_for_jobs(job_ids: list[str], timeout: float, on_poll=None) -> dict[str, list[dict[str, str]]]:
    deadline = time.monotonic() + timeout
    while True:
        records = {job: job_records(job) for job in job_ids}
        if on_poll is not None:
            on_poll(records)
        done = all(recs and all(r.get("JobState") in TERMINAL for r in recs) for recs in records.values())
        if done or time.monotonic() > deadline:
            return records
        time.sleep(3)


def logs_tail(run_dir: Path, n: int = 40) -> str:
    out = []
    for log in sorted((run_dir / "slurm" / "logs").glob("*.out")):
        lines = log.read_text(errors="replace").splitlines()
        out.append(f"--- {log.name}\n" + "\n".join(lines[-n:]))
    return "\n".join(out)[-12000:]


def job_env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SANDLAB_BENCHMARK_DIR": str(SHARED_BENCHMARKS), "WANDB_MODE": "offline",
           "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WANDB_API_KEY", None)
    return env


@pytest.mark.timeout(1800)
def test_demo_recipe_jobs_on_slurm(slurm_cluster, tmp_path):
    run_dir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "sandlab.launch.submit", "--config-name", "demo", f"run.dir={run_dir}",
           "launcher.serve.enabled=true",  # the teacher as a vLLM server job; data jobs read its endpoint
           "data.partition.count=2",  # generate/solve/filter as a 2-task array, then a merge job
           # The smallest data that still reaches training: few problems, one short solution each, and one vote is
           # enough (what is tested here is the job machinery, not the data's quality).
           "data.generate.num_problems=16", "data.solve.k=1", "data.solve.sampling.n=1", "data.solve.sampling.max_tokens=160",
           "data.agreement.min_votes=1", "data.agreement.min_agreement=0.34",
           # The student is the tiny random model: ZeRO-3 start-up, sharded checkpoints, requeue and resume are the
           # same code as for SmolLM2 at a twentieth of the size (a 135M ZeRO-3 checkpoint is ~2 GB on disk).
           "model=tiny_random",
           # accelerate + DeepSpeed ZeRO-3 with 2 processes
           "train=cpu_zero3", f"train.trl.max_steps={TRAIN_STEPS}", "train.trl.save_steps=2", "+train.trl.save_total_limit=1",
           # one evaluated model (one vLLM engine start in the eval job)
           "eval.models=[tuned]", "eval.limit=2", "eval.sampling.default.max_tokens=48"]
    try:
        check_demo_jobs(cmd, run_dir)
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # gigabytes of ZeRO shards


TRAIN_STEPS = 12  # of the demo's training job (a checkpoint every 2)


def check_demo_jobs(cmd: list[str], run_dir: Path) -> None:
    submitted = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=job_env(), timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    ids = dict(re.findall(r"submitted (\S+)\s+job (\d+)", submitted.stdout))
    assert list(ids) == ["demo-serve", "demo-data-array", "demo-data", "demo-train", "demo-eval", "demo-stop-serve"], submitted.stdout
    assert "GPU-hour estimate" in submitted.stdout

    # Requeue the training job once a checkpoint is complete, as a preemption would. Enough steps that a
    # 3-second poll sees one before the job ends, on fast CPUs too.
    requeued = []

    def requeue_after_checkpoint(records):
        train = records[ids["demo-train"]]
        done = sorted((run_dir / "checkpoints" / "final").glob("checkpoint-*/trainer_state.json"))
        if not requeued and train and train[0].get("JobState") == "RUNNING" and done and int(done[-1].parent.name.split("-")[1]) < TRAIN_STEPS:
            subprocess.run(["scontrol", "requeue", ids["demo-train"]], check=True)
            requeued.append(done[-1].parent.name)

    records = wait_for_jobs(list(ids.values()), timeout=1500, on_poll=requeue_after_checkpoint)
    states = {name: sorted({r.get("JobState") for r in records[job]}) for name, job in ids.items()}
    expected = {name: ["COMPLETED"] for name in ids}
    expected["demo-serve"] = ["CANCELLED"]  # stopped by the cleanup job once the data jobs ended
    assert states == expected, f"{states}\n{logs_tail(run_dir)}"
    assert all(r.get("ExitCode") == "0:0" for name in ids if name != "demo-serve" for r in records[ids[name]])
    assert len(records[ids["demo-data-array"]]) == 2  # one task per partition

    # The data went through the served teacher and both partitions, and was merged.
    array_log = (run_dir / "slurm" / "logs" / f"demo-data-array-{ids['demo-data-array']}_0.out").read_text()
    served = re.findall(r"serving embedded://smollm2-135m-instruct at (http://\S+)", (run_dir / "slurm" / "logs" / f"demo-serve-{ids['demo-serve']}.out").read_text())
    assert len(served) == 1 and f"POST {served[0]}/chat/completions" in array_log
    assert (run_dir / "endpoints" / "teacher.txt").read_text() == ""  # the cancelled server took its URL out
    assert sorted(p.name for p in (run_dir / "partitions").iterdir()) == ["00000-of-00002", "00001-of-00002"]
    assert (run_dir / "sft" / "train.jsonl").read_text().strip()
    # Training was requeued after a checkpoint, resumed from a complete one, and finished.
    assert requeued, "the training job finished before a checkpoint could be observed"
    train_log = (run_dir / "slurm" / "logs" / f"demo-train-{ids['demo-train']}.out").read_text()
    assert "restart 1" in train_log and re.search(r"resuming from \S*checkpoint-\d+", train_log)
    assert json.loads((run_dir / "checkpoints/final/train_metrics.json").read_text())["global_step"] == TRAIN_STEPS
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert set(results) == {"tuned"} and (run_dir / "report.md").exists()

    # Every job recorded its Slurm job in the run, and its W&B run carries job type and job id.
    jobs = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    recorded = {j["slurm"].get("job_name") for j in jobs}
    assert {"demo-data-array", "demo-data", "demo-train", "demo-eval"} <= recorded
    assert [j["slurm"].get("restart_count", "0") for j in jobs if j["slurm"].get("job_name") == "demo-train"] == ["0", "1"]
    tracked = run_summary(run_dir)
    assert {r["job_type"] for r in tracked["runs"]} >= {"data", "train", "eval"}
    assert json.loads(tracked["config"]["slurm"])["job_id"] in set(ids.values())
    artifacts = {(a["name"], a["type"]) for a in tracked["artifacts"]}
    assert ("demo-sft", "dataset") in artifacts and ("demo-eval", "eval-results") in artifacts


@pytest.mark.timeout(1200)
def test_two_point_sweep_is_one_array_job_with_a_summary(slurm_cluster, tmp_path, sft_file):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sandlab.launch.cli", "--config-name", "tiny", "-m", "hydra/launcher=sandlab_slurm",
           "data=from_file", f"data.dataset_path={sft_file}", "stages=[train,eval,report]", "eval.models=[tuned]",
           f"hydra.sweep.dir={sweep_dir}", "train.trl.learning_rate=1e-4,1e-2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=job_env(), timeout=1100)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = (sweep_dir / "sweep_summary.csv").read_text().splitlines()
    header, points = rows[0].split(","), [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert header[:3] == ["point", "train.trl.learning_rate", "status"] and "final_loss" in header
    assert [p["train.trl.learning_rate"] for p in points] == ["0.0001", "0.01"] and all(p["status"] == "done" for p in points)
    assert points[0]["final_loss"] != points[1]["final_loss"]
    assert "| point | train.trl.learning_rate | status |" in result.stdout  # printed at the end

    # One array job, one task per point.
    infos = [json.loads((sweep_dir / str(i) / "run_info.json").read_text())["slurm"] for i in (0, 1)]
    assert infos[0]["array_job_id"] == infos[1]["array_job_id"] and sorted(i["array_task_id"] for i in infos) == ["0", "1"]
    # Each point is a W&B run in the sweep's group; the summary is one more run there.
    group = f"tiny-sweep-{sweep_dir.name}"
    runs = [run_summary(sweep_dir / str(i))["runs"][0] for i in (0, 1)]
    assert [r["group"] for r in runs] == [group, group] and [r["name"] for r in runs] == [f"{group}-0", f"{group}-1"]
    assert "train.trl.learning_rate=0.0001" in runs[0]["tags"]
    summary = run_summary(sweep_dir)
    assert summary["runs"][0]["job_type"] == "sweep-summary" and summary["runs"][0]["group"] == group
