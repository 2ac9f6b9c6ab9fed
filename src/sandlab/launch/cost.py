"""GPU-hour estimate of a recipe before it is submitted: tokens x model FLOPs per token / (assumed
utilization x peak FLOP/s of the cluster's GPU).

Token counts come from the recipe (problems x samples x max_tokens x launcher.cost.output_fill for
generation and evaluation; examples x epochs x tokens per example for training, measured on the SFT
file when it already exists). FLOPs per token come from the model's HF config when it can be read
(sandlab.train.throughput.model_flops_per_token: 6 x matmul params + causal attention for training,
a third of that for a forward pass), else from ``num_params_b`` in the model/teacher group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sandlab.config import RecipeConfig
from sandlab.stages import is_data_stage
from sandlab.train.throughput import model_flops_per_token, peak_tflops

# Items per benchmark, for evaluation token counts (eval.limit caps them).
BENCHMARK_ITEMS = {"aime24": 30, "aime25": 30, "math500": 500, "gpqa_diamond": 198}

# trl.SFTConfig's defaults for what the estimate reads (importing trl takes seconds; a test keeps these equal).
SFT_DEFAULTS = {"max_length": 1024, "max_steps": -1, "num_train_epochs": 3.0}


@dataclass
class CostLine:
    job: str
    tokens: float
    flops_per_token: float | None
    utilization: float
    gpu_hours: float | None
    basis: str


def _model_config(path: str):
    """The HF config of a local/embedded/cached model, or None (a Hub id with no Hub)."""
    try:
        from transformers import AutoConfig  # noqa: PLC0415

        from sandlab.models import looks_like_local_path, resolve_model_path  # noqa: PLC0415

        if path.startswith("embedded://") or looks_like_local_path(path):
            return AutoConfig.from_pretrained(resolve_model_path(path))
        return AutoConfig.from_pretrained(path, local_files_only=True)  # a Hub id: only from the local HF cache
    except Exception:  # noqa: BLE001 (no config: fall back to num_params_b)
        return None


def flops_per_token(path: str, num_params_b: float | None, context: int, *, training: bool) -> tuple[float | None, str]:
    """(FLOPs per token, where the number came from). An explicit ``num_params_b`` wins (a MoE's
    active parameters: the HF config would count it as dense); else the HF config."""
    if num_params_b:
        return (6.0 if training else 2.0) * num_params_b * 1e9, f"{num_params_b:g}B params"
    config = _model_config(path)
    if config is not None:
        try:
            train_flops = model_flops_per_token(config, context)
        except AttributeError:  # not a decoder config this formula knows
            return None, "unknown size (set num_params_b)"
        return (train_flops if training else train_flops / 3.0), "HF config"
    return None, "unknown size (set num_params_b)"


def _sft_rows(path: Path) -> tuple[int, float] | None:
    """(examples, mean tokens per example ~ characters / 4) of an SFT JSONL file or directory
    (``<run>/sft``), or None when there is none or it cannot be read."""
    if path.is_dir():
        path = path / "train.jsonl"
    if not path.is_file():
        return None
    rows, chars = 0, 0
    try:
        with path.open() as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    messages = [*row.get("prompt", []), *row.get("completion", [])] if "completion" in row else row.get("messages", [])
                    rows += 1
                    chars += sum(len(m.get("content") or "") for m in messages if isinstance(m, dict))
    except (OSError, ValueError, AttributeError):
        return None
    return (rows, chars / max(rows, 1) / 4.0) if rows else None


def _sampling(cfg: RecipeConfig, bench: str):
    return cfg.eval.sampling.get(bench) or cfg.eval.sampling.get("default")


def estimate(cfg: RecipeConfig, run_dir: Path, stages: list[str]) -> tuple[list[CostLine], float | None]:
    """Cost lines for the given stages and the peak TFLOP/s used (None: no GPU peak known)."""
    c = cfg.launcher.cost
    peak = cfg.cluster.peak_tflops or (peak_tflops(cfg.cluster.gpu_type) if cfg.cluster.gpu_type else None)
    lines: list[CostLine] = []

    def add(job: str, tokens: float, fpt: tuple[float | None, str], utilization: float, basis: str) -> None:
        flops, source = fpt
        hours = tokens * flops / (utilization * peak * 1e12) / 3600.0 if flops and peak else None
        lines.append(CostLine(job, tokens, flops, utilization, hours, f"{basis}; FLOPs from {source}"))

    d = cfg.data
    if any(is_data_stage(s) for s in stages) and not d.dataset_path:
        t = cfg.teacher
        # Distillation (data.generate.source) takes existing problems: the teacher writes no problems.
        per_problem = 0 if d.generate.source else d.generate.sampling.max_tokens * max(d.generate.sampling.n, 1)
        if "solve" in stages:
            per_problem += d.solve.k * d.solve.sampling.max_tokens
        if "difficulty" in stages:
            per_problem += d.difficulty.sampling.n * d.difficulty.sampling.max_tokens
        if "score" in stages and d.score.scorer == "judge":  # one judgement per scored response
            per_problem += (d.solve.k if d.score.best_of_n else 1) * d.score.judge.sampling.max_tokens
        if "hike" in stages:
            per_problem += d.hike.sampling.max_tokens + d.solve.k * d.solve.sampling.max_tokens
        tokens = d.generate.num_problems * per_problem * c.output_fill
        if per_problem:
            add("data (teacher)", tokens, flops_per_token(t.model, t.num_params_b, t.max_model_len // 2, training=False), c.inference_mfu,
                f"{d.generate.num_problems} problems x {per_problem} max tokens x fill {c.output_fill}")
        if "passrate" in stages:  # the student solves every kept problem m times
            p = d.passrate
            problems = d.generate.num_problems * c.kept_fraction
            student = cfg.model.path if p.student.model == "tuned" else p.student.model
            add("data (passrate)", problems * p.m * p.sampling.max_tokens * c.output_fill,
                flops_per_token(student, cfg.model.num_params_b if p.student.model == "tuned" else p.student.num_params_b,
                                p.sampling.max_tokens // 2, training=False),
                c.inference_mfu, f"~{problems:.0f} problems x {p.m} samples x {p.sampling.max_tokens} max tokens x fill {c.output_fill}")
    if "train" in stages:
        t = cfg.train
        measured = _sft_rows(Path(d.dataset_path) if d.dataset_path and Path(d.dataset_path).exists() else run_dir / "sft")
        if measured:
            examples, per_example = measured
            basis = f"{examples} examples in the SFT file"
        elif c.train_examples:
            examples, per_example = c.train_examples, c.mean_train_tokens
            basis = f"{examples} examples (launcher.cost.train_examples)"
        else:
            examples = d.generate.num_problems * c.kept_fraction * (2 if "hike" in cfg.stages else 1)
            per_example = c.mean_train_tokens
            basis = f"~{examples:.0f} examples (num_problems x kept_fraction {c.kept_fraction})"
        max_length, max_steps, epochs = (t.trl.get(k, SFT_DEFAULTS[k]) for k in ("max_length", "max_steps", "num_train_epochs"))
        per_example = min(per_example, max_length)
        if max_steps and max_steps > 0:
            tokens = max_steps * t.global_batch_size * (max_length if t.packing else per_example)
            basis = f"{max_steps} steps x batch {t.global_batch_size}"
        else:
            tokens = examples * per_example * epochs
            basis += f" x {per_example:.0f} tokens x {epochs} epochs"
        add("train", tokens, flops_per_token(cfg.model.path, cfg.model.num_params_b, int(per_example), training=True), c.train_mfu, basis)
    if "grpo" in stages:
        r = cfg.rl
        prompts = d.generate.num_problems * c.kept_fraction
        tokens, completion = 0.0, 0
        for stage in r.stages:
            per_step = r.per_device_train_batch_size * r.num_processes * r.gradient_accumulation_steps  # completions
            completions = stage.max_steps * per_step if stage.max_steps > 0 else prompts * r.num_generations * stage.num_train_epochs
            tokens += completions * stage.max_completion_length * c.output_fill
            completion = max(completion, stage.max_completion_length)
        # generation (a forward pass per token) plus the policy update (forward + backward): ~4x a forward
        fpt, source = flops_per_token(cfg.model.path, cfg.model.num_params_b, completion // 2, training=False)
        add("grpo", tokens, ((fpt * 4.0) if fpt else None, source), c.train_mfu / 2,
            f"{len(r.stages)} stage(s), {r.num_generations} completions per prompt, fill {c.output_fill}")
    if "eval" in stages:
        e = cfg.eval
        tokens = 0.0
        for bench in e.benchmarks:
            items = min(BENCHMARK_ITEMS.get(bench, 500), e.limit or 10**9)
            sampling = _sampling(cfg, bench)
            n, max_tokens = (sampling.n, sampling.max_tokens) if sampling else (1, 32768)
            tokens += items * n * max_tokens * c.output_fill
        tokens *= len(e.models)
        add("eval", tokens, flops_per_token(cfg.model.path, cfg.model.num_params_b, e.backend.max_model_len // 2, training=False), c.inference_mfu,
            f"{len(e.models)} model(s) x {', '.join(e.benchmarks)}")
    return lines, peak


def format_estimate(lines: list[CostLine], peak: float | None, cluster: str) -> str:
    header = f"GPU-hour estimate (cluster {cluster}: " + (f"{peak:g} peak TFLOP/s per GPU)" if peak else "no GPU peak known; set cluster.gpu_type or cluster.peak_tflops)")
    rows = [f"{'job':<16} {'tokens':>12} {'GFLOP/token':>12} {'util':>6} {'GPU-hours':>10}  basis"]
    for line in lines:
        gflops = f"{line.flops_per_token / 1e9:.3g}" if line.flops_per_token else "?"
        hours = f"{line.gpu_hours:,.1f}" if line.gpu_hours is not None else "-"
        rows.append(f"{line.job:<16} {line.tokens:>12,.0f} {gflops:>12} {line.utilization:>6.0%} {hours:>10}  {line.basis}")
    total = [line.gpu_hours for line in lines if line.gpu_hours is not None]
    if total:
        rows.append(f"{'total':<16} {'':>12} {'':>12} {'':>6} {sum(total):>10,.1f}")
    return "\n".join([header, *rows])
