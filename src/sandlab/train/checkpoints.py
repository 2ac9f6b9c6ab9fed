"""Training checkpoints: find the newest complete one to resume from, and consolidate a sharded
DeepSpeed ZeRO checkpoint into a plain Hugging Face safetensors checkpoint.

    python train/consolidate.py <run>/checkpoints/final/checkpoint-<step> <out-dir>
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from sandlab.errors import ConfigError

# Files beside the weights that make a checkpoint loadable and render prompts like training did.
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def checkpoint_step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def latest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` whose trainer state was written (the Trainer writes it last), so a
    job killed while saving resumes from the previous, complete one."""
    candidates = sorted((p for p in Path(output_dir).glob("checkpoint-*") if checkpoint_step(p) >= 0), key=checkpoint_step, reverse=True)
    return next((p for p in candidates if (p / "trainer_state.json").is_file()), None)


def consolidate(checkpoint_dir: str | Path, output_dir: str | Path, dtype: str | None = None) -> Path:
    """ZeRO-2/3 shards (``global_step*/``) -> a HF checkpoint (safetensors) + config and tokenizer files.

    The fp32 master weights are gathered on CPU (about 4 bytes per parameter of RAM) and saved through
    ``save_pretrained`` so tied embeddings are handled; ``dtype`` defaults to the model config's."""
    import torch  # noqa: PLC0415
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415

    src, out = Path(checkpoint_dir), Path(output_dir)
    if not (src / "latest").is_file() and not any(src.glob("global_step*")):
        raise ConfigError(f"{src} is not a DeepSpeed ZeRO checkpoint (no 'latest' file or global_step*/ directory)")
    if not (src / "config.json").is_file():
        raise ConfigError(f"{src} has no config.json; pass a checkpoint-<step> directory written by the Trainer")
    state = get_fp32_state_dict_from_zero_checkpoint(str(src))
    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # tied output embeddings point at the loaded input embeddings again
    missing = [k for k, t in model.state_dict().items() if t.device.type == "meta"]
    if missing:
        raise ConfigError(f"{src}: the ZeRO checkpoint lacks weights for {missing[:3]}; is it from this model?")
    target = getattr(torch, dtype) if dtype else (getattr(config, "dtype", None) or torch.float32)
    model.to(target if isinstance(target, torch.dtype) else getattr(torch, str(target))).save_pretrained(out, safe_serialization=True)
    for name in _MODEL_FILES:
        if name != "config.json" and (src / name).is_file():
            shutil.copy2(src / name, out / name)
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse  # noqa: PLC0415
    import sys  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="Consolidate a DeepSpeed ZeRO checkpoint into HF safetensors.")
    parser.add_argument("checkpoint_dir")
    parser.add_argument("output_dir")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the model config's dtype")
    args = parser.parse_args(argv)
    try:
        print(consolidate(args.checkpoint_dir, args.output_dir, args.dtype))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
