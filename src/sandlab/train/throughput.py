"""Training throughput arithmetic: padding waste of a batching scheme, model FLOPs per token, MFU.

* Padding waste runs TRL's own collator (``DataCollatorForLanguageModeling``) over a length
  distribution: padded batches as in the paper recipe (random order, padded to the longest row of
  each batch) versus padding-free best-fit-decreasing packing (``trl.pack_dataset``).
* FLOPs per token: 6 x (non-embedding parameters + LM head) for the matmuls of forward+backward, plus
  6 x layers x hidden x context for causal attention (QK^T and AV, half the square, times 3 for the
  backward pass). PaLM's convention (used by torchtitan and most MFU reports) counts the full square,
  12 x ...; both are reported, the causal one is the stricter.
* MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Dense bf16 peak (no sparsity), from the vendors' datasheets.
PEAK_TFLOPS = {"H100 SXM": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "A100": 312.0, "MI300X": 1307.4, "MI250X": 383.0}


def peak_tflops(device_name: str) -> float | None:
    name = device_name.upper()
    if "H100" in name:
        return PEAK_TFLOPS["H100 PCIe"] if "PCIE" in name else PEAK_TFLOPS["H100 NVL"] if "NVL" in name else PEAK_TFLOPS["H100 SXM"]
    for key in ("H200", "A100", "MI300X", "MI250X"):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def synthetic_lengths(n: int, *, median: int = 6000, sigma: float = 0.7, low: int = 512, high: int = 32768, seed: int = 0) -> list[int]:
    """Log-normal token lengths, roughly the shape of long reasoning traces (SAND keeps traces over 500
    words; R1-style traces have a long right tail), clipped to [low, high]."""
    import math  # noqa: PLC0415

    rng = random.Random(seed)
    return [max(low, min(high, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


@dataclass
class WasteReport:
    scheme: str
    real_tokens: int
    computed_tokens: int  # positions the model runs on, padding included
    steps: int

    @property
    def waste(self) -> float:
        return 1.0 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.real_tokens / self.steps if self.steps else 0.0


def padding_waste(lengths: list[int], *, per_device_batch: int, max_length: int, packing: bool, pad_to_multiple_of: int | None = None,
                  seed: int = 0) -> WasteReport:
    """Collate one epoch with TRL's collator and count real vs computed token positions (per device)."""
    import datasets  # noqa: PLC0415
    from trl import pack_dataset  # noqa: PLC0415
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # noqa: PLC0415

    truncated = [min(n, max_length) for n in lengths]
    ds = datasets.Dataset.from_dict({"input_ids": [[1] * n for n in truncated]})
    if packing:
        ds = pack_dataset(ds, max_length, strategy="bfd")
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=packing, pad_to_multiple_of=pad_to_multiple_of)
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)  # the Trainer's random sampler
    real = computed = steps = 0
    for start in range(0, len(order), per_device_batch):
        batch = [ds[i] for i in order[start : start + per_device_batch]]
        out = collator(batch)
        real += sum(len(b["input_ids"]) for b in batch)
        computed += out["input_ids"].numel()
        steps += 1
    return WasteReport("packed (bfd, padding-free)" if packing else "padded batches", real, computed, steps)


def model_flops_per_token(config, context: int, *, causal: bool = True) -> float:
    """Forward+backward FLOPs per trained token for a decoder-only transformer config; ``causal=False``
    counts the full attention square (PaLM / torchtitan convention)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv = getattr(text, "num_key_value_heads", heads)
    inter = text.intermediate_size
    attn_proj = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2  # q, o + k, v
    mlp = 3 * hidden * inter  # gate, up, down (SwiGLU)
    matmul_params = layers * (attn_proj + mlp) + hidden * text.vocab_size  # + LM head
    return 6.0 * matmul_params + (6.0 if causal else 12.0) * layers * heads * head_dim * context


def mfu(tokens_per_second: float, flops_per_token: float, peak_tflops_value: float) -> float:
    return tokens_per_second * flops_per_token / (peak_tflops_value * 1e12)
