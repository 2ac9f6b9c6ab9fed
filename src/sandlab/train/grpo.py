"""GRPO with TRL on verifiable problems (AM-Thinking-v1 style).

* Reward: 1.0 when the shared grader (math-verify, or the option letter for multiple choice) accepts
  the completion's final answer, else 0.0; optionally the DAPO soft overlong punishment.
* Prompts: records with a ``problem`` (or a ``prompt`` conversation) and an ``answer``, usually the
  output of the ``passrate`` data stage run with the SFT model as student (keeps 0 < pass rate < 1).
* Stages: each ``rl.stages`` entry is one GRPOTrainer run with its own completion limit and learning
  rate, starting from the previous stage's weights; a finished stage is skipped on rerun.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from sandlab.config import OverlongPolicy, RLConfig, RLStage
from sandlab.errors import ConfigError, EmptyDatasetError
from sandlab.records import read_jsonl

log = logging.getLogger(__name__)


def load_rl_dataset(path: str, system_prompt: str):
    """JSONL records -> a datasets.Dataset with ``prompt`` (conversation), ``answer``, ``answer_kind``."""
    import datasets  # noqa: PLC0415

    if not Path(path).is_file():
        raise EmptyDatasetError(f"GRPO prompts {path} do not exist; run the passrate stage or set rl.dataset_path")
    rows = []
    for i, rec in enumerate(read_jsonl(path)):
        answer = rec.get("answer") if rec.get("answer") is not None else rec.get("reference_answer")
        if answer is None:
            raise ConfigError(f"GRPO prompts {path}: record {i + 1} has no answer (open-ended tasks cannot be rewarded)")
        if isinstance(rec.get("prompt"), list):
            prompt = [m for m in rec["prompt"] if m["role"] != "assistant"]
        elif rec.get("problem"):
            prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": rec["problem"]}]
        else:
            raise ConfigError(f"GRPO prompts {path}: record {i + 1} has neither 'problem' nor a 'prompt' conversation")
        kind = rec.get("answer_kind") or (rec.get("source") or {}).get("answer_kind") or "math"
        rows.append({"prompt": prompt, "answer": str(answer), "answer_kind": kind})
    if not rows:
        raise EmptyDatasetError(f"GRPO prompts {path} are empty")
    return datasets.Dataset.from_list(rows)


class GraderReward:
    """TRL reward function: the shared grader's verdict on each completion (1.0 / 0.0)."""

    __name__ = "grader_reward"

    def __init__(self, timeout_s: float = 5.0):
        from sandlab.grading import GradingPool  # noqa: PLC0415

        self.pool = GradingPool(timeout_s=timeout_s)

    def __call__(self, completions: list[Any], answer: list[str], answer_kind: list[str] | None = None, **_: Any) -> list[float]:
        from sandlab.grading import GradeItem  # noqa: PLC0415

        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        kinds = answer_kind or ["math"] * len(texts)
        grades = self.pool.grade_many([GradeItem(response=t, gold=a, kind=k) for t, a, k in zip(texts, answer, kinds)])
        return [1.0 if g.correct else 0.0 for g in grades]

    def close(self) -> None:
        self.pool.close()


def grpo_arguments(cfg: RLConfig, stage: RLStage, *, output_dir: str, run_name: str, seed: int, report_to: list[str]) -> dict[str, Any]:
    """The trl.GRPOConfig keyword arguments of one stage: rl.trl as given, plus what sandlab sets itself
    (the run, the stage's length and learning rate, the batch of completions, the overlong policy,
    model loading)."""
    from sandlab.train.sft import model_init_kwargs  # noqa: PLC0415

    kwargs: dict[str, Any] = {
        **cfg.trl,
        "output_dir": output_dir,
        "run_name": run_name,
        "seed": seed,
        "report_to": report_to,
        "learning_rate": stage.learning_rate,
        "num_train_epochs": stage.num_train_epochs,
        "max_steps": stage.max_steps,
        "max_completion_length": stage.max_completion_length,
        "num_generations": cfg.num_generations,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "mask_truncated_completions": cfg.overlong == OverlongPolicy.mask,
        "model_init_kwargs": model_init_kwargs(cfg.attn_implementation, cfg.trl),
    }
    if cfg.overlong == OverlongPolicy.penalty:  # the grader's reward and the soft overlong punishment
        kwargs["reward_weights"] = [1.0, 1.0]
    return kwargs


def build_grpo_config(cfg: RLConfig, stage: RLStage, *, output_dir: str, run_name: str, seed: int, report_to: list[str]):
    from trl import GRPOConfig  # noqa: PLC0415

    from sandlab.train.sft import trl_args  # noqa: PLC0415
    from sandlab.train.validate import GRPO_RESERVED, check_trl_keys  # noqa: PLC0415

    check_trl_keys(cfg.trl, GRPOConfig, where="rl.trl", reserved=GRPO_RESERVED)
    return trl_args(GRPOConfig, grpo_arguments(cfg, stage, output_dir=output_dir, run_name=run_name, seed=seed, report_to=report_to))


def run_grpo(model_path: str, dataset_path: str, cfg: RLConfig, *, output_dir: str, run_name: str, seed: int, report_to: list[str],
             grading_timeout_s: float = 5.0) -> str:
    """Run every GRPO stage in order; returns the final stage's checkpoint directory."""
    from transformers import AutoTokenizer  # noqa: PLC0415
    from trl import GRPOTrainer  # noqa: PLC0415
    from trl.rewards import get_soft_overlong_punishment  # noqa: PLC0415

    from sandlab.train.checkpoints import latest_complete_checkpoint  # noqa: PLC0415

    dataset = load_rl_dataset(dataset_path, cfg.system_prompt)
    current = model_path
    for index, stage in enumerate(cfg.stages):
        stage_dir = Path(output_dir) / f"stage-{index}"
        if (stage_dir / "stage.done").exists():
            log.info("GRPO stage %d already done in %s", index, stage_dir)
            current = str(stage_dir)
            continue
        reward = GraderReward(grading_timeout_s)
        rewards: list[Any] = [reward]
        if cfg.overlong == OverlongPolicy.penalty:
            rewards.append(get_soft_overlong_punishment(stage.max_completion_length, min(cfg.overlong_buffer, stage.max_completion_length // 2)))
        args = build_grpo_config(cfg, stage, output_dir=str(stage_dir), run_name=f"{run_name}-stage{index}", seed=seed, report_to=report_to)
        tokenizer = AutoTokenizer.from_pretrained(current)
        trainer = GRPOTrainer(model=current, reward_funcs=rewards, args=args, train_dataset=dataset, processing_class=tokenizer)
        last = latest_complete_checkpoint(stage_dir)
        log.info("GRPO stage %d: max_completion_length=%d, lr=%g, from %s%s", index, stage.max_completion_length, stage.learning_rate, current,
                 f", resuming {last}" if last else "")
        try:
            trainer.train(resume_from_checkpoint=str(last) if last else None)
        finally:
            reward.close()
        trainer.save_model(str(stage_dir))
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(str(stage_dir))
            for ckpt in stage_dir.glob("checkpoint-*"):  # the stage's weights are saved; keep disk use bounded
                shutil.rmtree(ckpt, ignore_errors=True)
            (stage_dir / "stage.done").write_text(str(stage.max_completion_length))
        current = str(stage_dir)
    return current
