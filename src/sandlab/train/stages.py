"""The training stages: ``train`` (TRL SFT of the student) and ``grpo`` (TRL GRPO from the SFT model).

With more than one process a stage relaunches itself under ``accelerate launch``; every rank then runs
the same stage in-process, and only rank 0 reports it done.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sandlab.config import RecipeConfig
from sandlab.errors import ConfigError, EmptyDatasetError
from sandlab.stages import Kind, Stage, StageContext, always, is_data_stage
from sandlab.train.launcher import is_main_process, launch_distributed, under_launcher

log = logging.getLogger("sandlab")


def data_source(ctx: StageContext) -> dict[str, Any]:
    """How the SFT dataset is read: its format (``auto`` detects it), and a Hub dataset's config and split."""
    d = ctx.cfg.data
    return {"data_format": str(d.format), "data_config": d.config, "data_split": d.split}


def run_train(ctx: StageContext) -> dict[str, Any] | None:
    from sandlab.models import resolve_model_path  # noqa: PLC0415

    ctx.close()  # free the teacher engine's memory before training
    cfg, t = ctx.cfg, ctx.cfg.train
    model_path = resolve_model_path(cfg.model.path)
    dataset = ctx.sft_dataset()
    if not Path(dataset).exists() and not cfg.data.dataset_path:
        raise EmptyDatasetError(f"no SFT dataset at {dataset}; run the data stages first or set data.dataset_path")
    if t.num_processes > 1 and not under_launcher():
        launch_distributed(ctx.root, ctx.run.path, "sft.py", t.num_processes, t.accelerate_config, sequence_parallel_size=t.sequence_parallel_size,
                           attn_implementation=t.attn_implementation)
    else:
        from sandlab.train.sft import run_sft  # noqa: PLC0415

        run_sft(model_path, dataset, t, output_dir=str(ctx.tuned_dir()), run_name=f"{cfg.recipe}-sft", seed=cfg.run.seed,
                report_to=["wandb"] if cfg.wandb.mode != "disabled" else [], chat_template_path=ctx.path(cfg.model.chat_template),
                mix=cfg.data.mix, variants=cfg.data.variants, **data_source(ctx))
    if not is_main_process():
        return None
    return {"model": model_path, "dataset": dataset, "output": str(ctx.tuned_dir())}


def require_training_data(cfg: RecipeConfig, stages: list[str], run_dir: Path) -> None:
    """Training needs this run's data stages, data.dataset_path, or an SFT file already in the run."""
    if "train" not in stages or cfg.data.dataset_path or any(is_data_stage(s) for s in cfg.stages):
        return
    if not (run_dir / "sft" / "train.jsonl").exists():
        raise ConfigError(f"recipe {cfg.recipe} trains on an existing SFT dataset: set data.dataset_path=<run>/sft, a JSONL file or a Hub id "
                          f"(or run.dir=<a run with sft/train.jsonl>)")


def check_train(ctx: StageContext) -> None:
    """Model, dataset, template and the TRL/DeepSpeed settings, before any weights load."""
    from sandlab.models import looks_like_local_path, resolve_model_path  # noqa: PLC0415

    cfg = ctx.cfg
    resolve_model_path(cfg.model.path, what="model.path")
    path = cfg.data.dataset_path
    if path and not Path(path).exists() and looks_like_local_path(path):
        raise EmptyDatasetError(f"data.dataset_path={path!r} does not exist; give a JSONL file/dir or a Hub dataset id")
    require_training_data(cfg, ["train"], ctx.run.path)
    if ctx.run.is_done("train") or under_launcher():
        return
    from sandlab.train.validate import validate_training  # noqa: PLC0415

    dataset = ctx.sft_dataset()
    checked = validate_training(resolve_model_path(cfg.model.path), cfg.train, accelerate_config=ctx.root / cfg.train.accelerate_config,
                                chat_template_path=ctx.path(cfg.model.chat_template),
                                dataset_path=dataset if (cfg.data.dataset_path or Path(dataset).exists()) else None,
                                mix=cfg.data.mix, variants=cfg.data.variants, **data_source(ctx))
    log.info("training config checked: %s", checked)


def run_grpo(ctx: StageContext) -> dict[str, Any] | None:
    ctx.close()
    cfg, r = ctx.cfg, ctx.cfg.rl
    start = ctx.sft_model()
    dataset = ctx.rl_dataset()
    if r.num_processes > 1 and not under_launcher():
        launch_distributed(ctx.root, ctx.run.path, "grpo.py", r.num_processes, r.accelerate_config)
    else:
        from sandlab.train.grpo import run_grpo as train_grpo  # noqa: PLC0415

        train_grpo(start, dataset, r, output_dir=str(ctx.grpo_dir()), run_name=f"{cfg.recipe}-grpo", seed=cfg.run.seed,
                   report_to=["wandb"] if cfg.wandb.mode != "disabled" else [], grading_timeout_s=cfg.eval.grading_timeout_s, verify=cfg.verify)
    if not is_main_process():
        return None
    return {"model": start, "dataset": dataset, "output": str(ctx.grpo_final())}


def check_grpo(ctx: StageContext) -> None:
    from sandlab.train.validate import validate_grpo  # noqa: PLC0415

    if "train" not in ctx.cfg.stages:
        ctx.sft_model()
    if not ctx.run.is_done("grpo") and not under_launcher():
        log.info("GRPO config checked: %s", validate_grpo(ctx.cfg.rl))


def _saved_checkpoints(directory: Path) -> list[Path]:
    """A training output directory, once it holds a checkpoint or a saved model that a rerun would resume from or keep."""
    held = [*directory.glob("checkpoint-*"), *directory.glob("*/checkpoint-*"), *directory.glob("config.json"), *directory.glob("*/config.json")]
    return [directory] if held else []


STAGES = (
    Stage("train", Kind.TRAIN, run_train, preflight=check_train, needs_student=True, needs_gpu=always, reads_export_only=True,
          config=("model.path", "model.chat_template", "data.dataset_path", "data.format", "data.config", "data.split", "data.mix",
                  "data.variants", "train"), saved=lambda ctx: _saved_checkpoints(ctx.tuned_dir())),
    Stage("grpo", Kind.TRAIN, run_grpo, preflight=check_grpo, needs_student=True, needs_gpu=always, config=("rl", "model.path"),
          saved=lambda ctx: _saved_checkpoints(ctx.grpo_dir())),
)
