"""Multi-process training: the stage relaunches its own entry script under ``accelerate launch`` with
the run's resolved recipe, and each rank then runs the same stage in-process."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from sandlab.errors import ConfigError, SandlabError

log = logging.getLogger("sandlab")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def under_launcher() -> bool:
    """True inside a process that `accelerate launch` / torchrun started."""
    return "WORLD_SIZE" in os.environ


def write_accelerate_config(root: Path, accelerate_config: str, num_processes: int, *, num_machines: int = 1, sequence_parallel_size: int = 1,
                            attn_implementation: str | None = None) -> str:
    """The accelerate config a launch uses, as YAML: the DeepSpeed JSON path made absolute (so it works
    from any directory and the run records what it used), the process/machine counts filled in, and
    with ``sequence_parallel_size`` > 1 accelerate's ParallelismConfig for DeepSpeed Ulysses (the
    Trainer shards each batch along the sequence, and TRL adds position_ids and reduces the loss)."""
    import yaml  # noqa: PLC0415

    path = root / accelerate_config
    if not path.is_file():
        raise ConfigError(f"accelerate config {accelerate_config!r} does not exist (train.accelerate_config / rl.accelerate_config)")
    acc = yaml.safe_load(path.read_text()) or {}
    ds = acc.get("deepspeed_config") or {}
    if ds.get("deepspeed_config_file") and not Path(ds["deepspeed_config_file"]).is_absolute():
        ds["deepspeed_config_file"] = str(root / ds["deepspeed_config_file"])
    if ds and num_machines > 1:
        ds["deepspeed_multinode_launcher"] = "standard"  # torchrun on every node, no pdsh/ssh
    acc["num_processes"] = num_processes
    acc["num_machines"] = num_machines
    if sequence_parallel_size > 1:
        acc["parallelism_config"] = {
            "parallelism_config_sp_backend": "deepspeed",
            "parallelism_config_sp_size": sequence_parallel_size,
            "parallelism_config_dp_replicate_size": num_processes // sequence_parallel_size,
            "parallelism_config_sp_seq_length_is_variable": True,  # rows differ in length from batch to batch
            "parallelism_config_sp_attn_implementation": attn_implementation,
        }
    return yaml.safe_dump(acc, sort_keys=False)


def launch_distributed(root: Path, run_dir: Path, entry: str, num_processes: int, accelerate_config: str, *, sequence_parallel_size: int = 1,
                       attn_implementation: str | None = None) -> None:
    """``accelerate launch train/<entry>`` with the run's own resolved recipe (run_dir/config.yaml)."""
    launcher_config = run_dir / "accelerate_config.yaml"
    launcher_config.write_text(write_accelerate_config(root, accelerate_config, num_processes, sequence_parallel_size=sequence_parallel_size,
                                                       attn_implementation=attn_implementation))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher_config),
        "--num_processes", str(num_processes), str(root / "train" / entry),
        "--config-dir", str(run_dir), "--config-name", "config", f"run.dir={run_dir}", f"hydra.run.dir={run_dir}",
    ]
    log.info("launching: %s", " ".join(cmd))
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        raise SandlabError(f"distributed training exited with code {result.returncode}; see the log above, then rerun with run.dir={run_dir} to resume")
