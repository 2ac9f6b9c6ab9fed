"""Supervised fine-tuning with TRL's SFTTrainer on prompt/completion conversations.

Loss is on the completion (assistant) tokens only; the tokenizer, with the chat template used in
training, is saved beside the weights so evaluation renders prompts the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sandlab.config import TrainConfig
from sandlab.errors import ConfigError, EmptyDatasetError

log = logging.getLogger(__name__)


def load_sft_dataset(path: str):
    """A JSONL file/dir of ``{prompt, completion}`` conversations, or a Hub dataset id."""
    import datasets  # noqa: PLC0415

    p = Path(path)
    if p.exists():
        files = [str(f) for f in sorted(p.glob("*.jsonl"))] if p.is_dir() else [str(p)]
        if not files:
            raise ConfigError(f"SFT dataset directory {p} has no *.jsonl files")
        ds = datasets.load_dataset("json", data_files=files, split="train")
    else:
        try:
            ds = datasets.load_dataset(path, split="train")
        except Exception as exc:  # noqa: BLE001 (offline, missing, private: same advice)
            raise ConfigError(f"could not load SFT dataset {path!r} ({type(exc).__name__}); give a local JSONL file/dir or a reachable Hub id") from None
    if len(ds) == 0:
        raise EmptyDatasetError(f"SFT dataset {path} is empty; nothing to train on")
    missing = {"prompt", "completion"} - set(ds.column_names)
    if missing:
        raise ConfigError(f"SFT dataset {path} lacks columns {sorted(missing)}; expected prompt/completion conversations")
    return ds.select_columns(["prompt", "completion"])


def build_sft_config(cfg: TrainConfig, *, output_dir: str, run_name: str, seed: int, report_to: list[str]):
    from trl import SFTConfig  # noqa: PLC0415

    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        run_name=run_name,
        seed=seed,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a ratio of total steps
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        packing=cfg.packing,
        bf16=cfg.bf16,
        gradient_checkpointing=cfg.gradient_checkpointing,
        use_liger_kernel=cfg.use_liger_kernel,
        save_strategy=cfg.save_strategy,
        logging_steps=cfg.logging_steps,
        use_cpu=cfg.use_cpu,
        completion_only_loss=True,
        report_to=report_to,
        model_init_kwargs={"attn_implementation": cfg.attn_implementation, "dtype": "bfloat16" if cfg.bf16 else "float32"},
    )
    kwargs.update(cfg.extra_args)
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid training settings for trl.SFTConfig: {str(exc).splitlines()[0]}") from None


def run_sft(model_path: str, dataset_path: str, cfg: TrainConfig, *, output_dir: str, run_name: str, seed: int, report_to: list[str], chat_template_path: str | None = None) -> str:
    """Train and save the final model (weights + tokenizer/chat template) to ``output_dir``."""
    from transformers import AutoTokenizer  # noqa: PLC0415
    from trl import SFTTrainer  # noqa: PLC0415

    dataset = load_sft_dataset(dataset_path)
    args = build_sft_config(cfg, output_dir=output_dir, run_name=run_name, seed=seed, report_to=report_to)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if chat_template_path:  # the template trained with is saved with the checkpoint, so eval renders alike
        tokenizer.chat_template = Path(chat_template_path).read_text()
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer)
    last = None
    if any(Path(output_dir).glob("checkpoint-*")):
        last = True  # resume from the newest checkpoint after a killed job
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
