"""Supervised fine-tuning with TRL's SFTTrainer on prompt/completion conversations.

Datasets in any ``sandlab.readers`` format (``data.format``, default auto) become those conversations, the
trace rewritten into ``train.reasoning_format``; sandlab's own prompt/completion JSONL is used as is.

Conversations are rendered by ``ChatFormat`` (the template renders the prompt, the assistant content is
kept verbatim, so no template can drop the reasoning trace); loss is on the completion tokens only; the
token closing an assistant turn is the eos of tokenizer, generation config and data alike; the
tokenizer, with the chat template used in training, is saved beside the weights so evaluation
renders prompts the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sandlab.config import TrainConfig
from sandlab.errors import ConfigError, EmptyDatasetError
from sandlab.records import write_json

log = logging.getLogger(__name__)


def _export_files(p: Path) -> list[str]:
    """The JSONL files of a local prompt/completion dataset (an export directory: its all-variants file)."""
    files = [str(f) for f in sorted(p.rglob("*.jsonl"))] if p.is_dir() else [str(p)]
    if p.is_dir() and (p / "train.jsonl").exists():
        files = [str(p / "train.jsonl")]
    return files


def _is_prompt_completion_jsonl(p: Path) -> bool:
    """A local JSONL file/dir whose first row is a prompt/completion conversation (sandlab's export)."""
    import json  # noqa: PLC0415

    from sandlab.readers import READERS  # noqa: PLC0415

    files = _export_files(p) if p.exists() else []
    if not files or not all(f.endswith(".jsonl") for f in files):
        return False
    with open(files[0], encoding="utf-8") as fh:
        line = next((ln for ln in fh if ln.strip()), "")
    try:
        row = json.loads(line) if line else None
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and READERS["prompt_completion"].detect(row)


def _load_one(path: str, *, data_format: str = "auto", reasoning_format: str = "think", config: str | None = None, split: str = "train",
              filter: dict[str, Any] | None = None):  # noqa: A002
    """One SFT dataset as prompt/completion conversations (+ variant when it has them). sandlab's own
    prompt/completion JSONL, already in the ``think`` trace format, is trained on verbatim; every other
    format (and other reasoning formats) goes through ``sandlab.readers``."""
    import datasets  # noqa: PLC0415

    from sandlab.readers import matches, read_records  # noqa: PLC0415

    p = Path(path)
    if data_format in ("auto", "prompt_completion") and reasoning_format == "think" and _is_prompt_completion_jsonl(p):
        ds = datasets.load_dataset("json", data_files=_export_files(p), split="train")
        return ds.filter(lambda row: matches(filter, row, row), desc="filter") if filter else ds
    result = read_records(path, data_format, config, split, reasoning_format=reasoning_format, filter=filter)
    rows = [{"prompt": r["prompt"], "completion": r["completion"], **({"variant": r.get("variant")} if any("variant" in x for x in result.records) else {})}
            for r in result.records]
    if not rows:
        reasons = f"; dropped rows: {result.reasons()}" if result.dropped else ""
        raise EmptyDatasetError(f"SFT dataset {path} (format {result.format}) yields no training rows{reasons}")
    log.info("SFT dataset %s: %d rows in format %s (trace as %s), %d rows dropped %s", path, len(rows), result.format, reasoning_format,
             len(result.dropped), result.reasons() or "")
    return datasets.Dataset.from_list(rows)


def _load_entry(entry: dict[str, Any], reasoning_format: str):
    """One dataset of the mix: read, filtered, its rows labelled with the entry's variant, sampled."""
    import math  # noqa: PLC0415

    ds = _load_one(entry["path"], data_format=entry["format"], reasoning_format=reasoning_format, config=entry["config"], split=entry["split"],
                   filter=entry["filter"])
    if entry["variant"]:
        ds = ds.remove_columns([c for c in ("variant",) if c in ds.column_names]).add_column("variant", [str(entry["variant"])] * len(ds))
    size = entry["count"] if entry["count"] is not None else math.ceil(entry["fraction"] * len(ds)) if entry["fraction"] is not None else None
    if size is not None:
        if size > len(ds):
            log.warning("data.mix entry %s asks for %d rows but has %d; taking all", entry["path"], size, len(ds))
        ds = ds.shuffle(seed=0).select(range(min(size, len(ds))))
    return ds


def load_sft_dataset(path: str, *, mix: list[Any] | tuple[Any, ...] = (), variants: list[str] | tuple[str, ...] = (), data_format: str = "auto",
                     reasoning_format: str = "think", config: str | None = None, split: str = "train"):
    """SFT datasets (local files/dirs or Hub ids, in any ``sandlab.readers`` format; ``data_format`` unless an
    entry names its own, ``config``/``split`` for a Hub ``path``) as prompt/completion conversations,
    concatenated; ``mix`` entries are paths or ``{path, format, config, split, variant, count or fraction,
    filter}``; with ``variants``, only rows whose ``variant`` is listed."""
    import datasets  # noqa: PLC0415

    from sandlab.readers import mix_entry  # noqa: PLC0415

    entries = [mix_entry({"path": path, "config": config, "split": split}, data_format), *(mix_entry(e, data_format) for e in mix)]
    parts = [_load_entry(e, reasoning_format) for e in entries]
    mix = [e["path"] for e in entries[1:]]
    if variants:
        for p, ds in zip([path, *mix], parts):
            if "variant" not in ds.column_names:
                raise ConfigError(f"data.variants={list(variants)} but SFT dataset {p} has no 'variant' column")
        parts = [ds.filter(lambda row: row["variant"] in variants, desc="select variants") for ds in parts]
        found = {v for ds in parts for v in ds.unique("variant")}
        absent = [v for v in variants if v not in found]
        if absent:
            raise EmptyDatasetError(f"data.variants asks for {absent}, but no SFT dataset has rows of them; add their exports with data.mix=[...]")
    parts = [d.select_columns(["prompt", "completion"]) for d in parts]
    if any(d.features != parts[0].features for d in parts):  # e.g. an export's messages carry extra keys: keep role/content
        parts = [datasets.Dataset.from_list([{k: [{"role": m["role"], "content": m["content"]} for m in ex[k]] for k in ("prompt", "completion")}
                                             for ex in d]) for d in parts]
    ds = datasets.concatenate_datasets(parts)
    if len(ds) == 0:
        where = f" with variants {list(variants)}" if variants else ""
        raise EmptyDatasetError(f"SFT dataset {path}{' + ' + ', '.join(mix) if mix else ''} has no rows{where}; nothing to train on")
    return ds


def load_tokenizer(model_path: str, chat_template_path: str | None = None):
    from transformers import AutoTokenizer  # noqa: PLC0415

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if chat_template_path:  # the template trained with is saved with the checkpoint, so eval renders alike
        tokenizer.chat_template = Path(chat_template_path).read_text()
    return tokenizer


def render_dataset(dataset, fmt):
    """prompt/completion conversations -> plain-text prompt/completion (see sandlab.train.formatting)."""
    return dataset.map(lambda ex: fmt.render(ex["prompt"], ex["completion"]), remove_columns=["prompt", "completion"], desc="render conversations")


def model_init_kwargs(attn_implementation: str, trl: dict[str, Any]) -> dict[str, Any]:
    """How TRL loads the model: the recipe's attention kernel, bf16 weights when training in bf16 (TRL's
    rule: bf16 unless set, or fp16 is), then any trl.model_init_kwargs of the recipe."""
    bf16 = trl.get("bf16")
    if bf16 is None:
        bf16 = not trl.get("fp16", False)
    return {"attn_implementation": attn_implementation, "dtype": "bfloat16" if bf16 else "float32", **(trl.get("model_init_kwargs") or {})}


def sft_arguments(cfg: TrainConfig, *, output_dir: str, run_name: str, seed: int, report_to: list[str], eos_token: str | None = None) -> dict[str, Any]:
    """The trl.SFTConfig keyword arguments of a recipe: train.trl as given, plus what sandlab sets itself
    (the run, the batch layout, packing, the completion-only loss, the turn-end eos, model loading)."""
    sp = {}
    if cfg.sequence_parallel_size > 1:  # Ulysses splits every row into sequence_parallel_size equal shards
        # gloo (CPU) cannot all-gather rows of different lengths across the group: pad them all to max_length there.
        multiple = int(cfg.trl.get("max_length") or 1024) if cfg.trl.get("use_cpu") else cfg.sequence_parallel_size
        sp = {"pad_to_multiple_of": cfg.trl.get("pad_to_multiple_of") or multiple}
    return {
        **cfg.trl,
        **sp,
        "output_dir": output_dir,
        "run_name": run_name,
        "seed": seed,
        "report_to": report_to,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "packing": cfg.packing,
        "completion_only_loss": True,
        "eos_token": eos_token,
        "model_init_kwargs": model_init_kwargs(cfg.attn_implementation, cfg.trl),
    }


def build_sft_config(cfg: TrainConfig, *, output_dir: str, run_name: str, seed: int, report_to: list[str], eos_token: str | None = None):
    from trl import SFTConfig  # noqa: PLC0415

    from sandlab.train.validate import SFT_RESERVED, check_trl_keys  # noqa: PLC0415

    check_trl_keys(cfg.trl, SFTConfig, where="train.trl", reserved=SFT_RESERVED)
    return trl_args(SFTConfig, sft_arguments(cfg, output_dir=output_dir, run_name=run_name, seed=seed, report_to=report_to, eos_token=eos_token))


def trl_args(config_cls: type, kwargs: dict[str, Any]):
    """A TRL config from its keyword arguments; a bad field or value is one line, not a traceback."""
    try:
        return config_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid training settings for trl.{config_cls.__name__}: {str(exc).splitlines()[0]}") from None


def build_sft_trainer(model_path: str, dataset_path: str, cfg: TrainConfig, *, output_dir: str, run_name: str, seed: int, report_to: list[str],
                      chat_template_path: str | None = None, mix: list[Any] | tuple[Any, ...] = (), variants: list[str] | tuple[str, ...] = (),
                      data_format: str = "auto", data_config: str | None = None, data_split: str = "train"):
    from trl import SFTTrainer  # noqa: PLC0415

    from sandlab.train.formatting import ChatFormat  # noqa: PLC0415

    # The data first: a dataset that yields no rows stops here, before the model loads.
    conversations = load_sft_dataset(dataset_path, mix=mix, variants=variants, data_format=data_format, reasoning_format=str(cfg.reasoning_format),
                                     config=data_config, split=data_split)
    tokenizer = load_tokenizer(model_path, chat_template_path)
    fmt = ChatFormat.from_tokenizer(tokenizer)
    if not fmt.template_keeps_trace:
        log.info("the chat template drops reasoning from assistant turns; completions are rendered verbatim, so the trace is kept")
    dataset = render_dataset(conversations, fmt)
    args = build_sft_config(cfg, output_dir=output_dir, run_name=run_name, seed=seed, report_to=report_to, eos_token=fmt.turn_end)
    peft_config = None
    if cfg.lora_r > 0:
        from peft import LoraConfig  # noqa: PLC0415

        targets = cfg.lora_target_modules[0] if cfg.lora_target_modules == ["all-linear"] else list(cfg.lora_target_modules)
        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model_path, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    # TRL has made the turn-end token the eos of tokenizer and generation config; pad follows the tokenizer.
    generation = trainer.model.generation_config
    if generation is not None and tokenizer.pad_token_id is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return trainer


def run_sft(model_path: str, dataset_path: str, cfg: TrainConfig, *, output_dir: str, run_name: str, seed: int, report_to: list[str],
            chat_template_path: str | None = None, mix: list[Any] | tuple[Any, ...] = (), variants: list[str] | tuple[str, ...] = (),
            data_format: str = "auto", data_config: str | None = None, data_split: str = "train") -> str:
    """Train and save the final model (weights + tokenizer/chat template) to ``output_dir``."""
    trainer = build_sft_trainer(model_path, dataset_path, cfg, output_dir=output_dir, run_name=run_name, seed=seed, report_to=report_to,
                                chat_template_path=chat_template_path, mix=mix, variants=variants, data_format=data_format,
                                data_config=data_config, data_split=data_split)
    # Resume from the newest checkpoint (sharded ZeRO-3 ones included) after a killed job.
    from sandlab.train.checkpoints import latest_complete_checkpoint  # noqa: PLC0415

    last = latest_complete_checkpoint(output_dir)
    if last is not None:
        log.info("resuming from %s", last)
    if cfg.sequence_parallel_size > 1:  # every SP run, resumed or not, iterates its epochs the same way
        from sandlab.train.sequence_parallel import enable_resume  # noqa: PLC0415

        enable_resume()
    output = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if cfg.lora_r > 0:  # evaluation (vLLM) loads a plain checkpoint: merge the adapters in
        merged = trainer.model.merge_and_unload()
        if trainer.accelerator.is_main_process:
            merged.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(output_dir)
        # What sweeps and reports compare: the last logged loss (over the whole run, resumes included).
        history = [{k: entry[k] for k in ("step", "loss", "grad_norm") if k in entry} for entry in trainer.state.log_history if "loss" in entry]
        write_json(Path(output_dir) / "train_metrics.json", {"final_loss": history[-1]["loss"] if history else None, "global_step": trainer.state.global_step,
                                                              "train_runtime_s": output.metrics.get("train_runtime"), "history": history})
    return output_dir
