"""The eval stage: every model of ``eval.models`` on every benchmark of ``eval.benchmarks`` through the
project's harness; results land in eval/results.json, samples and metrics per model and benchmark."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from sandlab.errors import EmptyDatasetError
from sandlab.records import write_json
from sandlab.stages import Kind, Stage, StageContext, always, holds_results


def model_for(ctx: StageContext, target: str) -> str:
    """``base``, ``tuned`` and ``grpo`` name this run's models; anything else is a path or Hub id."""
    return {"base": ctx.cfg.model.path, "tuned": str(ctx.tuned_dir()), "grpo": str(ctx.grpo_final())}.get(target, target)


def run(ctx: StageContext) -> dict[str, Any]:
    from sandlab.benchmarks import BENCHMARKS  # noqa: PLC0415
    from sandlab.eval.harness import evaluate_benchmark  # noqa: PLC0415
    from sandlab.inference import build_backend  # noqa: PLC0415

    ctx.close()
    cfg = ctx.cfg
    results = {}
    for name, target in ctx.eval_models():
        # The base model is rendered with the recipe's template; a tuned checkpoint carries its own.
        template = ctx.path(cfg.model.chat_template) if target == "base" else None
        backend_cfg = dataclasses.replace(cfg.eval.backend, model=model_for(ctx, target), chat_template=template or cfg.eval.backend.chat_template)
        out = ctx.run.sub("eval", name.replace("/", "__"))
        verifier = ctx.code_verifier if any(BENCHMARKS[b].kind == "code" for b in cfg.eval.benchmarks) else None
        with build_backend(backend_cfg) as backend:
            results[name] = {b: evaluate_benchmark(backend, ctx.pool, b, cfg.eval, out / b, verifier) for b in cfg.eval.benchmarks}
    write_json(ctx.run.path / "eval" / "results.json", results)
    return {"models": list(results)}


def preflight(ctx: StageContext) -> None:
    from sandlab.benchmarks import CODE_BENCHMARKS, load_benchmark  # noqa: PLC0415
    from sandlab.models import resolve_model_path  # noqa: PLC0415

    targets = [target for _, target in ctx.eval_models()]
    if "base" in targets:
        resolve_model_path(ctx.cfg.model.path, what="model.path")
    for name in ctx.cfg.eval.benchmarks:
        load_benchmark(name, limit=1, livecodebench=ctx.cfg.eval.livecodebench)
    if any(name in CODE_BENCHMARKS for name in ctx.cfg.eval.benchmarks):
        ctx.code_verifier  # noqa: B018 (its sandbox canary: one line before any model loads)
    if "tuned" in targets and "train" not in ctx.selected and not ctx.tuned_dir().exists():
        raise EmptyDatasetError(f"eval.models has 'tuned' but {ctx.tuned_dir()} does not exist; train first or set run.dir to a trained run")


def saved(ctx: StageContext) -> list[Path]:
    """Each model's benchmark directories with saved samples (finished, or chunks of an unfinished one)."""
    return sorted({p.parent for p in (ctx.run.path / "eval").glob("*/*/samples*") if holds_results(p)})


STAGE = Stage("eval", Kind.EVAL, run, preflight=preflight, needs_student=True, needs_gpu=always, reads_export_only=True, config=("eval",),
              saved=saved)
