"""Checks before a training launch, so a bad recipe fails in seconds instead of after a 30-minute model
load on 8 GPUs. Reads only configs and tokenizers (no weights)."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from sandlab.config import RLConfig, TrainConfig
from sandlab.errors import ConfigError

# trl.SFTConfig / trl.GRPOConfig arguments sandlab builds itself: not accepted in train.trl / rl.trl.
SFT_RESERVED = {
    "output_dir": "from run.dir", "run_name": "from the recipe name", "seed": "from run.seed", "report_to": "from wandb.mode",
    "per_device_train_batch_size": "train.per_device_train_batch_size", "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "packing": "train.packing", "parallelism_config": "train.sequence_parallel_size", "eos_token": "the chat template's turn-end token", "completion_only_loss": "always on: loss on completions only",
}
GRPO_RESERVED = {
    "output_dir": "from run.dir", "run_name": "from the recipe name", "seed": "from run.seed", "report_to": "from wandb.mode",
    **{key: f"per stage: rl.stages[i].{key}" for key in ("learning_rate", "num_train_epochs", "max_steps", "max_completion_length")},
    **{key: f"rl.{key}" for key in ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps")},
    "mask_truncated_completions": "from rl.overlong", "reward_weights": "from rl.overlong",
}
# Names of older transformers/TRL releases and where their setting went.
MOVED = {"warmup_ratio": "transformers 5 takes a warmup ratio as warmup_steps=<a float below 1>"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _fits(value: Any, hint: Any) -> bool:
    """Whether a recipe value can be the value of a field annotated ``hint`` (unknown kinds: yes)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return value in {m.value for m in hint}
    if (origin or hint) in (dict, list):
        return isinstance(value, origin or hint)
    return True


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def check_trl_keys(trl: dict[str, Any], config_cls: type, *, where: str, reserved: dict[str, str] | None = None) -> None:
    """Every key of ``trl`` (a recipe's train.trl / rl.trl) must be a field of the TRL config class and
    not one sandlab sets itself, and simple values must fit the field's type; the first that does not
    is one ConfigError line naming it (and, for an unknown key, the closest field names)."""
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    try:
        hints = typing.get_type_hints(config_cls)
    except Exception:  # noqa: BLE001 (an annotation this Python cannot evaluate: leave the values to TRL)
        hints = {}
    name = config_cls.__name__
    section = where.rsplit(".", 1)[0]
    for key, value in trl.items():
        if key in (reserved or {}):
            raise ConfigError(f"{where}.{key} is set by sandlab ({reserved[key]}); take it out of {where}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            article = "an" if name[0] in "AEFHILMNORSX" else "a"
            names = f"{', '.join(close[:-1])} or {close[-1]}" if len(close) > 1 else "".join(close)
            hint = f"; did you mean {names}?" if close else f"; see the fields of trl.{name}"
            raise ConfigError(f"{where}.{key} is not {article} {name} field{hint}{f' ({MOVED[key]})' if key in MOVED else ''}")
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(f"{where}.{key}={value!r} does not fit trl.{name}.{key} ({_type_name(hints[key])})")
    init = trl.get("model_init_kwargs")
    if init is not None and not isinstance(init, dict):
        raise ConfigError(f"{where}.model_init_kwargs must be a mapping, e.g. {{use_kernels: true}}")
    if "attn_implementation" in (init or {}):
        raise ConfigError(f"{where}.model_init_kwargs.attn_implementation is set by sandlab ({section}.attn_implementation); take it out of {where}")


def trl_value(trl: dict[str, Any], config_cls: type, key: str) -> Any:
    """The value TRL will use for ``key``: the recipe's, else the config class's default."""
    if key in trl:
        return trl[key]
    field = next(f for f in dataclasses.fields(config_cls) if f.name == key)
    return field.default_factory() if field.default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING else field.default


def validate_grpo(cfg: RLConfig) -> dict[str, object]:
    """GRPO's pre-launch checks: rl.trl against trl.GRPOConfig and the attention kernel; raise
    ConfigError for the first problem, return what was checked (for the log)."""
    from trl import GRPOConfig  # noqa: PLC0415

    check_trl_keys(cfg.trl, GRPOConfig, where="rl.trl", reserved=GRPO_RESERVED)
    if cfg.attn_implementation == "flash_attention_2" and not _installed("flash_attn"):
        raise ConfigError("rl.attn_implementation=flash_attention_2 needs flash-attn (pip install -e '.[cuda]'; on ROCm use the CK or Triton build); use sdpa otherwise")
    if trl_value(cfg.trl, GRPOConfig, "use_vllm") and not _installed("vllm"):
        raise ConfigError("rl.trl.use_vllm=true needs vllm; set rl.trl.use_vllm=false to generate with transformers")
    return {"trl": sorted(cfg.trl), "stages": len(cfg.stages)}


def validate_training(model_path: str, cfg: TrainConfig, *, accelerate_config: Path, chat_template_path: str | None = None,
                      dataset_path: str | None = None, mix: list[Any] | tuple[Any, ...] = (), variants: list[str] | tuple[str, ...] = (),
                      data_format: str = "auto", data_config: str | None = None, data_split: str = "train") -> dict[str, object]:
    """Raise ConfigError for the first problem; return what was checked (for the log)."""
    from transformers import AutoConfig  # noqa: PLC0415
    from trl import SFTConfig  # noqa: PLC0415

    from sandlab.train.formatting import ChatFormat  # noqa: PLC0415
    from sandlab.train.sft import load_sft_dataset, load_tokenizer  # noqa: PLC0415

    # Global batch arithmetic is checked when the recipe is composed (sandlab.config.TrainConfig).
    check_trl_keys(cfg.trl, SFTConfig, where="train.trl", reserved=SFT_RESERVED)
    use_cpu, max_length = trl_value(cfg.trl, SFTConfig, "use_cpu"), trl_value(cfg.trl, SFTConfig, "max_length")
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
        if acc.get("use_cpu") and not use_cpu:
            raise ConfigError(f"{accelerate_config.name} runs on CPU but train.trl.use_cpu is not true")
        if cfg.sequence_parallel_size > 1 and kind != "DEEPSPEED":
            raise ConfigError(f"train.sequence_parallel_size={cfg.sequence_parallel_size} is DeepSpeed Ulysses: pick a DeepSpeed accelerate config "
                              f"(e.g. accelerate_configs/zero3.yaml), not {accelerate_config.name}")
    if cfg.sequence_parallel_size > 1 and cfg.packing and cfg.attn_implementation == "sdpa":
        raise ConfigError("train.packing under sequence parallelism needs flash_attention_2/3: with sdpa, packed samples would attend to each other")
    if not use_cpu:
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise ConfigError("no GPU is visible (torch.cuda.is_available() is False); for a CPU run set train.trl.use_cpu=true train.trl.bf16=false train.attn_implementation=sdpa")
    if cfg.attn_implementation == "flash_attention_2" and not _installed("flash_attn"):
        raise ConfigError("train.attn_implementation=flash_attention_2 needs flash-attn (pip install -e '.[cuda]'; on ROCm use the CK or Triton build); use sdpa otherwise")
    if trl_value(cfg.trl, SFTConfig, "use_liger_kernel") and not _installed("liger_kernel"):
        raise ConfigError("train.trl.use_liger_kernel=true needs liger-kernel (pip install -e '.[cuda]')")
    if cfg.lora_r > 0 and not _installed("peft"):
        raise ConfigError("train.lora_r > 0 needs peft")
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the model config at {model_path} ({type(exc).__name__})") from None
    sp = cfg.sequence_parallel_size
    heads = getattr(model_config.get_text_config(), "num_attention_heads", None)
    kv_heads = getattr(model_config.get_text_config(), "num_key_value_heads", None) or heads
    if sp > 1 and heads and (heads % sp or (kv_heads % sp and sp % kv_heads)):
        raise ConfigError(f"train.sequence_parallel_size={sp} does not fit the model's {heads} attention / {kv_heads} KV heads "
                          "(Ulysses splits the heads: sp must divide them, and the KV heads or be a multiple of them)")
    limit = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    if limit and max_length and max_length > limit:
        raise ConfigError(f"train.trl.max_length={max_length} exceeds the model's max_position_embeddings={limit}")
    tokenizer = load_tokenizer(model_path, chat_template_path)
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    if vocab and len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab}: they do not belong together")
    fmt = ChatFormat.from_tokenizer(tokenizer)
    checked: dict[str, object] = {"turn_end": fmt.turn_end, "template_keeps_trace": fmt.template_keeps_trace, "max_position_embeddings": limit}
    if dataset_path:
        checked["samples"] = len(load_sft_dataset(dataset_path, mix=mix, variants=variants, data_format=data_format,
                                                  reasoning_format=str(cfg.reasoning_format), config=data_config, split=data_split))
    return checked
