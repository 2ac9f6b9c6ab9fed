"""GRPO with TRL on verifiable problems (AM-Thinking-v1 style).

* Reward: 1.0 when the shared grader (math-verify, or the option letter for multiple choice) accepts
  the completion's final answer, else 0.0; for code prompts (``answer_kind: code`` with ``tests``), 1.0
  when the completion's code passes every test in the sandbox (or the pass fraction); each reward
  function returns None for the other domain's prompts, so TRL adds up only the one that applies;
  optionally the DAPO soft overlong punishment.
* Prompts: records with a ``problem`` (or a ``prompt`` conversation) and an ``answer``, usually the
  output of the ``passrate`` data stage run with the SFT model as student (keeps 0 < pass rate < 1).
* Stages: each ``rl.stages`` entry is one GRPOTrainer run with its own completion limit and learning
  rate, starting from the previous stage's weights; a finished stage is skipped on rerun.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sandlab.config import CodeRewardMode, CodeVerifyConfig, OverlongPolicy, RLConfig, RLStage
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
        kind = rec.get("answer_kind") or (rec.get("source") or {}).get("answer_kind") or "math"
        answer = rec.get("answer") if rec.get("answer") is not None else rec.get("reference_answer")
        tests = rec.get("tests") or []
        if kind == "code" and not tests:
            raise ConfigError(f"GRPO prompts {path}: record {i + 1} is a code prompt without tests")
        if kind != "code" and answer is None:
            raise ConfigError(f"GRPO prompts {path}: record {i + 1} has no answer (open-ended tasks cannot be rewarded)")
        if isinstance(rec.get("prompt"), list):
            prompt = [m for m in rec["prompt"] if m["role"] != "assistant"]
        elif rec.get("problem"):
            prompt = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": rec["problem"]}]
        else:
            raise ConfigError(f"GRPO prompts {path}: record {i + 1} has neither 'problem' nor a 'prompt' conversation")
        # Tests as JSON text: one column type for math rows (empty) and code rows alike.
        rows.append({"prompt": prompt, "answer": "" if answer is None else str(answer), "answer_kind": kind,
                     "tests": json.dumps(tests) if kind == "code" else "", "fn_name": rec.get("fn_name") or ""})
    if not rows:
        raise EmptyDatasetError(f"GRPO prompts {path} are empty")
    return datasets.Dataset.from_list(rows)


def _texts(completions: list[Any]) -> list[str]:
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


class GraderReward:
    """TRL reward function: the shared grader's verdict on each completion (1.0 / 0.0); None for code
    prompts, which CodeReward scores."""

    __name__ = "grader_reward"

    def __init__(self, timeout_s: float = 5.0):
        from sandlab.grading import GradingPool  # noqa: PLC0415

        self.pool = GradingPool(timeout_s=timeout_s)

    def __call__(self, completions: list[Any], answer: list[str], answer_kind: list[str] | None = None, **_: Any) -> list[float | None]:
        from sandlab.grading import GradeItem  # noqa: PLC0415

        texts = _texts(completions)
        kinds = answer_kind or ["math"] * len(texts)
        mine = [i for i, k in enumerate(kinds) if k != "code"]
        grades = self.pool.grade_many([GradeItem(response=texts[i], gold=answer[i], kind=kinds[i]) for i in mine])
        rewards: list[float | None] = [None] * len(texts)
        for i, g in zip(mine, grades):
            rewards[i] = 1.0 if g.correct else 0.0
        return rewards

    def close(self) -> None:
        self.pool.close()


class CodeReward:
    """TRL reward function for code prompts: the completion's last ```python block run against the
    prompt's tests in the sandbox; 1.0 only when every test passes (``binary``, AM-Thinking-v1) or the
    pass fraction. None for other prompts, and for a sandbox failure (never scored as a wrong answer)."""

    __name__ = "code_reward"

    def __init__(self, verify: CodeVerifyConfig, mode: CodeRewardMode = CodeRewardMode.binary):
        from sandlab.verification import CodeVerifier  # noqa: PLC0415

        self.mode = CodeRewardMode(mode)
        self.verifier = CodeVerifier.from_config(verify)

    def __call__(self, completions: list[Any], answer_kind: list[str] | None = None, tests: list[str] | None = None,
                 fn_name: list[str] | None = None, **_: Any) -> list[float | None]:
        from sandlab.verification import CodeItem, TestCase  # noqa: PLC0415

        texts = _texts(completions)
        kinds = answer_kind or ["math"] * len(texts)
        mine = [i for i, k in enumerate(kinds) if k == "code"]
        fraction = self.mode == CodeRewardMode.pass_fraction
        items = [CodeItem(texts[i], tuple(TestCase(**t) for t in json.loads(tests[i])), fn_name[i] or None if fn_name else None, fraction)
                 for i in mine]
        rewards: list[float | None] = [None] * len(texts)
        for i, result in zip(mine, self.verifier.verify_many(items)):
            if not result.infra_error:
                rewards[i] = result.pass_frac if fraction else float(result.passed)
        return rewards

    def close(self) -> None:
        self.verifier.close()


def grpo_arguments(cfg: RLConfig, stage: RLStage, *, output_dir: str, run_name: str, seed: int, report_to: list[str],
                   code_reward: bool = False) -> dict[str, Any]:
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
    functions = 1 + int(code_reward) + int(cfg.overlong == OverlongPolicy.penalty)
    if functions > 1:  # the grader's reward, the code reward (each None off its domain), the soft overlong punishment
        kwargs["reward_weights"] = [1.0] * functions
    return kwargs


def build_grpo_config(cfg: RLConfig, stage: RLStage, *, output_dir: str, run_name: str, seed: int, report_to: list[str], code_reward: bool = False):
    from trl import GRPOConfig  # noqa: PLC0415

    from sandlab.train.sft import trl_args  # noqa: PLC0415
    from sandlab.train.validate import GRPO_RESERVED, check_trl_keys  # noqa: PLC0415

    check_trl_keys(cfg.trl, GRPOConfig, where="rl.trl", reserved=GRPO_RESERVED)
    return trl_args(GRPOConfig, grpo_arguments(cfg, stage, output_dir=output_dir, run_name=run_name, seed=seed, report_to=report_to,
                                               code_reward=code_reward))


def run_grpo(model_path: str, dataset_path: str, cfg: RLConfig, *, output_dir: str, run_name: str, seed: int, report_to: list[str],
             grading_timeout_s: float = 5.0, verify: CodeVerifyConfig | None = None) -> str:
    """Run every GRPO stage in order; returns the final stage's checkpoint directory."""
    from transformers import AutoTokenizer  # noqa: PLC0415
    from trl import GRPOTrainer  # noqa: PLC0415
    from trl.rewards import get_soft_overlong_punishment  # noqa: PLC0415

    from sandlab.train.checkpoints import latest_complete_checkpoint  # noqa: PLC0415

    dataset = load_rl_dataset(dataset_path, cfg.system_prompt)
    has_code = "code" in set(dataset["answer_kind"])
    current = model_path
    for index, stage in enumerate(cfg.stages):
        stage_dir = Path(output_dir) / f"stage-{index}"
        if (stage_dir / "stage.done").exists():
            log.info("GRPO stage %d already done in %s", index, stage_dir)
            current = str(stage_dir)
            continue
        closers: list[Any] = [GraderReward(grading_timeout_s)]
        if has_code:
            closers.append(CodeReward(verify or CodeVerifyConfig(), cfg.code_reward))
        rewards: list[Any] = list(closers)
        if cfg.overlong == OverlongPolicy.penalty:
            rewards.append(get_soft_overlong_punishment(stage.max_completion_length, min(cfg.overlong_buffer, stage.max_completion_length // 2)))
        args = build_grpo_config(cfg, stage, output_dir=str(stage_dir), run_name=f"{run_name}-stage{index}", seed=seed, report_to=report_to,
                                 code_reward=has_code)
        tokenizer = AutoTokenizer.from_pretrained(current)
        trainer = GRPOTrainer(model=current, reward_funcs=rewards, args=args, train_dataset=dataset, processing_class=tokenizer)
        last = latest_complete_checkpoint(stage_dir)
        log.info("GRPO stage %d: max_completion_length=%d, lr=%g, from %s%s", index, stage.max_completion_length, stage.learning_rate, current,
                 f", resuming {last}" if last else "")
        try:
            trainer.train(resume_from_checkpoint=str(last) if last else None)
        finally:
            for reward in closers:
                reward.close()
        trainer.save_model(str(stage_dir))
        if trainer.accelerator.is_main_process:
            tokenizer.save_pretrained(str(stage_dir))
            for ckpt in stage_dir.glob("checkpoint-*"):  # the stage's weights are saved; keep disk use bounded
                shutil.rmtree(ckpt, ignore_errors=True)
            (stage_dir / "stage.done").write_text(str(stage.max_completion_length))
        current = str(stage_dir)
    return current
