"""Fail in seconds, not after a model load or hours in a queue: paths exist, servers answer, datasets
are there. Each stage adds its own checks (``Stage.preflight``); what is common is here."""

from __future__ import annotations

from pathlib import Path

from sandlab.config import RecipeConfig
from sandlab.errors import ConfigError
from sandlab.stages import StageContext, get_stage


def needs_teacher(cfg: RecipeConfig, stages: list[str]) -> bool:
    return any(get_stage(s).needs_teacher(cfg) for s in stages)


def check_memory(ctx: StageContext, selected: list[str]):
    """The per-GPU memory plan of the selected stages on the recipe's cluster (None without GPUs); a job
    that does not fit stops here, before any weights load."""
    from sandlab.launch.memory import misfit_message, plan_recipe  # noqa: PLC0415

    pending = [s for s in selected if not ctx.run.is_done(s)]  # a finished stage loads nothing on a rerun
    plan = plan_recipe(ctx.cfg, ctx.root, pending)
    if plan is not None and not plan.fits:
        raise ConfigError(misfit_message(plan))
    return plan


def preflight(ctx: StageContext, selected: list[str]):
    """Raise ConfigError for the first problem; return the memory plan (None on a cluster without GPUs)."""
    from sandlab.models import resolve_model_path  # noqa: PLC0415

    cfg = ctx.cfg
    plan = check_memory(ctx, selected)
    if needs_teacher(cfg, selected):
        if cfg.teacher.backend == "openai":
            ctx.teacher.check_health()
        else:
            resolve_model_path(cfg.teacher.model, what="teacher.model")
    template = ctx.path(cfg.model.chat_template)
    if template and not Path(template).is_file():
        raise ConfigError(f"model.chat_template={cfg.model.chat_template!r} is not a file")
    for name in selected:
        check = get_stage(name).preflight
        if check is not None:
            check(ctx)
    return plan
