"""Look at training data the way the trainer sees it: rendered samples with the loss mask visible,
token counts, and the share of samples cut at ``train.trl.max_length``. Any ``sandlab.readers`` format
(auto-detected) is shown as it trains: the trace rewritten into ``train.reasoning_format``.

    python train/inspect_data.py --config-name <recipe> [data.dataset_path=<jsonl>] [--samples 2]
"""

from __future__ import annotations

import statistics
from typing import Any

from sandlab.config import TrainConfig


def inspect_dataset(model_path: str, dataset_path: str, cfg: TrainConfig, *, chat_template_path: str | None = None, samples: int = 1,
                    console: Any = None, mix: list[Any] | tuple[Any, ...] = (), variants: list[str] | tuple[str, ...] = (),
                    data_format: str = "auto", data_config: str | None = None, data_split: str = "train") -> dict[str, Any]:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415
    from tqdm.auto import tqdm  # noqa: PLC0415
    from trl import SFTConfig  # noqa: PLC0415

    from sandlab.train.formatting import ChatFormat  # noqa: PLC0415
    from sandlab.train.sft import load_sft_dataset, load_tokenizer  # noqa: PLC0415
    from sandlab.train.validate import trl_value  # noqa: PLC0415

    console = console or Console()
    max_length = trl_value(cfg.trl, SFTConfig, "max_length")  # what the trainer cuts at
    tokenizer = load_tokenizer(model_path, chat_template_path)
    fmt = ChatFormat.from_tokenizer(tokenizer)
    dataset = load_sft_dataset(dataset_path, mix=mix, variants=variants, data_format=data_format, reasoning_format=str(cfg.reasoning_format),
                               config=data_config, split=data_split)
    rows = []
    for i, ex in enumerate(tqdm(dataset, desc="tokenize", unit="sample", dynamic_ncols=True)):
        tok = fmt.tokenize(ex["prompt"], ex["completion"], max_length)
        rows.append(tok)
        if i < samples:
            text = Text()
            for token_id, trained in zip(tok["input_ids"], tok["completion_mask"]):
                piece = tokenizer.decode([token_id])
                text.append(piece, style="bold green" if trained else "dim")
            if tok["truncated"]:
                text.append(f"  [cut at max_length={max_length}; {tok['length'] - max_length} tokens dropped]", style="bold red")
            console.rule(f"sample {i}: {tok['length']} tokens ({tok['prompt_tokens']} prompt, {tok['length'] - tok['prompt_tokens']} completion); "
                         "green = trained on, dim = masked")
            console.print(text)
    lengths = [r["length"] for r in rows]
    trained = [sum(r["completion_mask"]) for r in rows]
    stats = {
        "samples": len(rows),
        "turn_end_token": fmt.turn_end,
        "template_keeps_trace": fmt.template_keeps_trace,
        "max_length": max_length,
        "truncated": sum(r["truncated"] for r in rows),
        "truncated_share": sum(r["truncated"] for r in rows) / len(rows),
        "tokens": sum(lengths),
        "trained_tokens": sum(trained),
        "mean_length": statistics.fmean(lengths),
        "p50_length": statistics.median(lengths),
        "p95_length": sorted(lengths)[min(len(lengths) - 1, int(0.95 * len(lengths)))],
        "max_sample_length": max(lengths),
    }
    table = Table(title=f"Training data: {dataset_path}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in stats.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    return stats
