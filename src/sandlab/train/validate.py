"""Checks before a training launch, so a bad recipe fails in seconds instead of after a 30-minute model
load on 8 GPUs. Reads only configs and tokenizers (no weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from sandlab.config import TrainConfig
from sandlab.errors import ConfigError


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def validate_training(model_path: str, cfg: TrainConfig, *, accelerate_config: Path, chat_template_path: str | None = None,
                      dataset_path: str | None = None, mix: list[str] | tuple[str, ...] = (), variants: list[str] | tuple[str, ...] = ()) -> dict[str, object]:
    """Raise ConfigError for the first problem; return what was checked (for the log)."""
    from transformers import AutoConfig  # noqa: PLC0415

    from sandlab.train.formatting import ChatFormat  # noqa: PLC0415
    from sandlab.train.sft import load_sft_dataset, load_tokenizer  # noqa: PLC0415

    # Global batch arithmetic is checked when the recipe is composed (sandlab.config.validate_recipe).
    if cfg.num_processes > 1:
        if not accelerate_config.is_file():
            raise ConfigError(f"train.accelerate_config={accelerate_config} does not exist; pick one under accelerate_configs/")
        acc = yaml.safe_load(accelerate_config.read_text()) or {}
        kind = acc.get("distributed_type", "")
        if kind == "DEEPSPEED" and not _installed("deepspeed"):
            raise ConfigError(f"{accelerate_config.name} uses DeepSpeed, which is not installed (pip install -e '.[cuda]')")
        ds_file = (acc.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if ds_file and not (Path(ds_file).is_file() or (accelerate_config.parent.parent / ds_file).is_file()):
            raise ConfigError(f"{accelerate_config.name} names deepspeed_config_file={ds_file}, which does not exist")
        if acc.get("use_cpu") and not cfg.use_cpu:
            raise ConfigError(f"{accelerate_config.name} runs on CPU but train.use_cpu=false")
    if not cfg.use_cpu:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise ConfigError("no GPU is visible (torch.cuda.is_available() is False); for a CPU run set train.use_cpu=true train.bf16=false train.attn_implementation=sdpa")
    if cfg.attn_implementation == "flash_attention_2" and not _installed("flash_attn"):
        raise ConfigError("train.attn_implementation=flash_attention_2 needs flash-attn (pip install -e '.[cuda]'; on ROCm use the CK or Triton build); use sdpa otherwise")
    if cfg.use_liger_kernel and not _installed("liger_kernel"):
        raise ConfigError("train.use_liger_kernel=true needs liger-kernel (pip install -e '.[cuda]')")
    if cfg.lora_r > 0 and not _installed("peft"):
        raise ConfigError("train.lora_r > 0 needs peft")
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the model config at {model_path} ({type(exc).__name__})") from None
    limit = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if limit and cfg.max_length > limit:
        raise ConfigError(f"train.max_length={cfg.max_length} exceeds the model's max_position_embeddings={limit}")
    tokenizer = load_tokenizer(model_path, chat_template_path)
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab}: they do not belong together")
    fmt = ChatFormat.from_tokenizer(tokenizer)
    checked: dict[str, object] = {"turn_end": fmt.turn_end, "template_keeps_trace": fmt.template_keeps_trace, "max_position_embeddings": limit}
    if dataset_path:
        checked["samples"] = len(load_sft_dataset(dataset_path, mix=mix, variants=variants))
    return checked
