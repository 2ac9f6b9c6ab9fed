"""Training throughput benchmark: padding waste (paper recipe's padded batches vs padding-free packing,
same length distribution, TRL's own collator) and the tokens/s and MFU of a training step of a
Qwen2-architecture model at long context on whatever device is present.

    python train/bench_throughput.py waste --samples 4000 --max-length 32768 --markdown
    python train/bench_throughput.py step --arch qwen2.5-1.5b --seq-len 16384 --markdown      # a GPU
    python train/bench_throughput.py step --arch tiny --seq-len 256 --device cpu             # checks the arithmetic
    python train/bench_throughput.py memory --arch qwen2.5-1.5b --seq-len 16384 --liger --markdown   # measured vs planned peak

`memory` runs `step` and puts its peak memory beside the memory plan's estimate for the same layout
(sandlab.launch.memory.train_plan: one device, no ZeRO, fp32 weights with bf16 autocast on a GPU, fp32
on CPU). On a GPU the peak is torch.cuda.max_memory_allocated; on CPU the growth of the process's peak
RSS from before the model is built (large allocations are mmapped, so freed tensors leave RSS).

`step` builds the model from its config (random weights, no download), keeps fp32 master weights
with bf16 autocast and a fused AdamW, as the Trainer does with bf16=True, and times forward +
backward of --accum sequences of --seq-len tokens (as packed rows) plus one optimizer step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a bare checkout too (GPU hosts)

from sandlab.train.throughput import mfu, model_flops_per_token, padding_waste, peak_tflops, synthetic_lengths  # noqa: E402

ARCHS = {  # Qwen2.5 shapes (config.json of the released models)
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8, tie_word_embeddings=False),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, vocab_size=1024),
}


def qwen2_config(arch: str, seq_len: int):
    from transformers import Qwen2Config

    shape = {"vocab_size": 151936, **ARCHS[arch]}
    return Qwen2Config(**shape, max_position_embeddings=max(32768, seq_len), rope_theta=1e6)


def cmd_waste(args) -> dict:
    lengths = synthetic_lengths(args.samples, median=args.median, sigma=args.sigma, high=args.max_length, seed=args.seed)
    if args.lengths:  # token lengths of a real dataset, one integer per line
        lengths = [int(x) for x in Path(args.lengths).read_text().split()]
    padded = padding_waste(lengths, per_device_batch=args.per_device_batch, max_length=args.max_length, packing=False)
    packed = padding_waste(lengths, per_device_batch=args.per_device_batch, max_length=args.max_length, packing=True)
    slots = args.per_device_batch * args.max_length
    rows = [{"scheme": r.scheme, "waste": r.waste, "real_tokens": r.real_tokens, "computed_tokens": r.computed_tokens, "steps": r.steps,
             "tokens_per_step": r.tokens_per_step, "slot_fill": r.tokens_per_step / slots} for r in (padded, packed)]
    result = {"samples": len(lengths), "max_length": args.max_length, "per_device_batch": args.per_device_batch,
              "mean_length": sum(lengths) / len(lengths), "rows": rows}
    if args.markdown:
        print(f"{len(lengths)} samples, mean {result['mean_length']:.0f} tokens, max_length {args.max_length}, {args.per_device_batch} rows per device step\n")
        print("| scheme | padding waste | real tokens | computed positions | steps/epoch | real tokens/step | share of the step's token slots |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['scheme']} | {100 * r['waste']:.2f}% | {r['real_tokens']:,} | {r['computed_tokens']:,} | {r['steps']} | {r['tokens_per_step']:,.0f} | {100 * r['slot_fill']:.1f}% |")
    return result


def cmd_step(args) -> dict:
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = qwen2_config(args.arch, args.seq_len)
    config._attn_implementation = args.attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    if args.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, config.vocab_size, (1, args.seq_len), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():  # one optimizer step over --accum sequences (the recipe's per-device batch)
        for _ in range(args.accum):
            with amp:
                loss = model(input_ids=ids, labels=ids).loss / args.accum
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    tokens_per_s = args.accum * args.seq_len / seconds
    flops = model_flops_per_token(config, args.seq_len)
    flops_palm = model_flops_per_token(config, args.seq_len, causal=False)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or peak_tflops(name)
    params = sum(p.numel() for p in model.parameters())
    result = {
        "device": name, "arch": args.arch, "params": params, "seq_len": args.seq_len, "attn": args.attn, "liger": args.liger,
        "grad_ckpt": args.grad_ckpt, "sequences_per_step": args.accum, "step_s": seconds, "tokens_per_s": tokens_per_s, "model_tflops_per_s": tokens_per_s * flops / 1e12,
        "mfu": mfu(tokens_per_s, flops, peak) if peak else None, "mfu_palm": mfu(tokens_per_s, flops_palm, peak) if peak else None, "peak_tflops": peak,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**30,
        "config": config,
    }
    if args.markdown:
        m = f"{100 * result['mfu']:.1f}% / {100 * result['mfu_palm']:.1f}%" if result["mfu"] is not None else "n/a"
        mem = f"{result['peak_mem_gib']:.1f}" if result["peak_mem_gib"] is not None else "n/a"
        print(f"| {name} | {args.arch} ({params / 1e9:.2f}B) | {args.seq_len} x {args.accum} | {args.attn}{' + liger' if args.liger else ''}{' + grad ckpt' if args.grad_ckpt else ''} "
              f"| {seconds:.3f} s | {tokens_per_s:,.0f} | {result['model_tflops_per_s']:.0f} | {m} | {mem} |")
    return result


def cmd_memory(args) -> dict:
    """A training step's measured peak beside the memory plan's estimate of the same layout."""
    from sandlab.launch.memory import TrainLayout, _shape_from_config, train_plan

    if args.estimate_only:  # the plan of a GPU run without the GPU (fp32 weights + bf16 autocast unless --device cpu)
        config = qwen2_config(args.arch, args.seq_len)
        result = {"device": args.device or "cuda", "params": None, "peak_mem_gib": None}
    else:
        markdown, args.markdown = args.markdown, False  # one row: the comparison
        result = cmd_step(args)
        args.markdown = markdown
        config = result.pop("config")
    cpu = result["device"] == "cpu"
    layout = TrainLayout(world=1, gpus_per_node=1, micro_batch=1, seq_len=args.seq_len, accumulation=args.accum, global_batch=args.accum, zero_stage=0,
                         gradient_checkpointing=args.grad_ckpt, liger=args.liger, attn=args.attn, precision="fp32" if cpu else "amp",
                         lm_head="liger" if args.liger else "full")
    plan = train_plan(_shape_from_config(config, "bench config"), layout)
    shape = _shape_from_config(config, "bench config")
    result.update(estimated_gib=plan.total_gib, estimate=[vars(i) for i in plan.items],
                  error=plan.total_gib / result["peak_mem_gib"] - 1 if result["peak_mem_gib"] else None)
    if args.markdown:
        kernels = args.attn + (" + liger" if args.liger else "") + (" + grad ckpt" if args.grad_ckpt else "")
        measured = f"{result['peak_mem_gib']:.2f}" if result["peak_mem_gib"] is not None else "-"
        error = f"{100 * result['error']:+.1f}%" if result["error"] is not None else "-"
        print(f"| {result['device']} | {args.arch} ({shape.params / 1e9:.2f}B) | {args.seq_len} x {args.accum} | {kernels} "
              f"| {measured} | {plan.total_gib:.2f} | {error} |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("waste", help="padding waste: padded batches vs padding-free packing")
    w.add_argument("--samples", type=int, default=4000)
    w.add_argument("--median", type=int, default=6000)
    w.add_argument("--sigma", type=float, default=0.7)
    w.add_argument("--max-length", type=int, default=32768)
    w.add_argument("--per-device-batch", type=int, default=2)
    w.add_argument("--lengths", help="file of token lengths (one per line) instead of the synthetic distribution")
    w.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("step", help="tokens/s and MFU of a training step")
    m = sub.add_parser("memory", help="a training step's peak memory beside the memory plan's estimate")
    for p in (s, m):
        p.add_argument("--arch", choices=sorted(ARCHS), default="qwen2.5-1.5b")
        p.add_argument("--seq-len", type=int, default=16384)
        p.add_argument("--attn", default="sdpa", help="sdpa | flash_attention_2 | eager")
        p.add_argument("--liger", action="store_true", help="Liger kernels (fused RMSNorm/RoPE/SwiGLU, fused linear cross-entropy)")
        p.add_argument("--grad-ckpt", action="store_true")
        p.add_argument("--accum", type=int, default=1, help="sequences per optimizer step (gradient accumulation)")
        p.add_argument("--steps", type=int, default=5 if p is s else 1)
        p.add_argument("--warmup", type=int, default=2 if p is s else 1)
        p.add_argument("--device")
        p.add_argument("--peak-tflops", type=float, help="override the device's dense bf16 peak")
    m.add_argument("--estimate-only", action="store_true", help="print the plan's estimate without running the step")
    for p in (w, s, m):
        p.add_argument("--markdown", action="store_true")
        p.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = {"waste": cmd_waste, "step": cmd_step, "memory": cmd_memory}[args.cmd](args)
    result.pop("config", None)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if not args.markdown:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
