"""The throughput benchmark's arithmetic, checked against independent counts (the measurements
themselves live in train/bench_throughput.py and docs/PERFORMANCE.md)."""

import random

import pytest

from sandlab.train.throughput import mfu, model_flops_per_token, padding_waste, peak_tflops


@pytest.mark.slow
def test_padding_waste_matches_a_hand_count():
    lengths = [3, 9, 5, 40, 7, 2, 11]
    report = padding_waste(lengths, per_device_batch=2, max_length=10, packing=False, seed=4)
    order = list(range(len(lengths)))
    random.Random(4).shuffle(order)
    clipped = [min(n, 10) for n in lengths]
    batches = [[clipped[i] for i in order[s : s + 2]] for s in range(0, len(order), 2)]
    assert report.real_tokens == sum(clipped) and report.steps == len(batches)
    assert report.computed_tokens == sum(max(b) * len(b) for b in batches)
    packed = padding_waste(lengths, per_device_batch=2, max_length=10, packing=True)
    assert packed.real_tokens == sum(clipped) and packed.waste == 0.0 and packed.steps < report.steps
    padded_to_8 = padding_waste(lengths, per_device_batch=2, max_length=10, packing=True, pad_to_multiple_of=8)
    assert padded_to_8.computed_tokens % 8 == 0 and padded_to_8.waste > 0  # the collator pads the flattened batch


def test_flops_per_token_counts_every_matmul_of_the_model():
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # includes the (tied) LM head
    context = 512
    expected = 6 * linear + 6 * config.num_hidden_layers * config.hidden_size * context
    assert model_flops_per_token(config, context) == pytest.approx(expected)
    assert mfu(1000.0, 1e9, 100.0) == pytest.approx(0.01)  # 1e12 FLOP/s of a 100 TFLOP/s device


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
                                        ("AMD Instinct MI300X", 1307.4), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_tflops_table(name, peak):
    assert peak_tflops(name) == peak
