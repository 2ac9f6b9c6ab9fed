"""CPU inference benchmark: the demo's solve work on vLLM-CPU (several thread settings) and transformers.

Each configuration runs in a fresh process (vLLM reads its CPU settings once, at engine start) on the
same prompts: the first ``--prompts`` MATH500 problems, ``--samples`` sampled solutions each (temperature
0.7, ``--max-tokens``), the demo's embedded SmolLM2-135M-Instruct. Reported: engine start, generation
wall time and output tokens per second.

    python eval/bench_cpu_inference.py [--configs vllm-reserve1,vllm-all-cores,hf] [--isa native|avx2] [--markdown]

``--isa avx2`` emulates an AVX2-only CPU on an AVX512/AMX machine (``eval/avx2_emulation``): torch's
dispatch, oneDNN and vLLM's kernel library and dtype choice see no AVX512/AMX. Clock speed, caches and
memory bandwidth stay this machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("SANDLAB_BENCHMARK_DIR", REPO.parent / "shared/benchmarks")) / "math500.jsonl"
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

# What each configuration sets before the backend starts. "auto" is sandlab's own choice
# (sandlab.inference.cpu.cpu_settings); the others pin vLLM's thread binding by hand.
CONFIGS = {
    "vllm-default": {"backend": "vllm", "env": {"SANDLAB_CPU_AUTO": "0"}},  # vLLM's own: 1 core reserved
    "vllm-auto": {"backend": "vllm", "env": {}},
    "vllm-nobind": {"backend": "vllm", "env": {"SANDLAB_CPU_AUTO": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}},
    # Intel's OpenMP runtime (PyPI intel-openmp, in <venv>/lib), the library vLLM's start-up warning asks for.
    "vllm-auto-iomp": {"backend": "vllm", "env": {"LD_PRELOAD": str(Path(sys.prefix) / "lib" / "libiomp5.so")}},
    # vLLM's engine core in this process instead of its own (one process start fewer).
    "vllm-auto-inproc": {"backend": "vllm", "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}},
    "hf": {"backend": "hf", "env": {}},
}

AVX2_EMULATION = REPO / "eval" / "avx2_emulation"  # its sitecustomize.py hides AVX512/AMX from torch and vLLM


def child(args: argparse.Namespace) -> None:
    """Run one configuration in this process and print one JSON line."""
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO)
    sys.path.insert(0, str(REPO / "src"))
    from sandlab.config import SamplingSettings  # noqa: PLC0415
    from sandlab.inference import build_backend  # noqa: PLC0415

    rows = [json.loads(line) for line in args.data.read_text().splitlines()[: args.prompts]]
    convs = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": r["problem"]}] for r in rows]
    cfg = {"backend": args.backend, "model": "embedded://smollm2-135m-instruct", "dtype": "bfloat16",
           "max_model_len": 2048, "enforce_eager": True}
    if args.backend == "hf":
        cfg["dtype"] = "auto"
        cfg["extra_engine_args"] = {"batch_size": args.hf_batch_size}
    started = time.perf_counter()
    backend = build_backend(cfg)
    start_s = time.perf_counter() - started
    sampling = SamplingSettings(n=args.samples, temperature=0.7, top_p=args.top_p, max_tokens=args.max_tokens, seed=0)
    t0 = time.perf_counter()
    outs = backend.generate(convs, sampling, desc="bench")
    gen_s = time.perf_counter() - t0
    tokens = sum(c.completion_tokens for o in outs for c in o)
    errors = sum(not c.ok for o in outs for c in o)
    dtype = getattr(backend, "dtype", cfg["dtype"])
    backend.close()
    print("RESULT " + json.dumps({"start_s": start_s, "generate_s": gen_s, "tokens": tokens, "errors": errors, "dtype": str(dtype)}))


def run_config(name: str, args: argparse.Namespace, emulate: bool) -> dict:
    spec = CONFIGS[name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **spec["env"])
    if emulate:
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                   PYTHONPATH=os.pathsep.join(p for p in (str(AVX2_EMULATION), env.get("PYTHONPATH")) if p))
    cmd = [sys.executable, __file__, "--child", "--backend", spec["backend"], "--data", str(args.data),
           "--prompts", str(args.prompts), "--samples", str(args.samples), "--max-tokens", str(args.max_tokens),
           "--hf-batch-size", str(args.hf_batch_size), "--top-p", str(args.top_p)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"config": name, "error": " | ".join(tail)}
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(config=name, process_s=wall, tokens_per_s=result["tokens"] / result["generate_s"])
    settings = [line.split("sandlab CPU settings for vLLM: ")[-1] for line in proc.stderr.splitlines() if "sandlab CPU settings" in line]
    result["notes"] = settings[-1] if settings else ""
    return result


def cpu_flags() -> str:
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    keep = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return " ".join(f for f in keep if f in flags) or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="vllm-default,vllm-auto,vllm-nobind,hf")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    # 1.0 skips vLLM's top-p step, which sorts the whole vocabulary of every sequence at every step.
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not args.data.exists():
        raise SystemExit(f"error: {args.data} not found; set SANDLAB_BENCHMARK_DIR or --data")
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: unknown configs {unknown}; known: {sorted(CONFIGS)}")
    results = [run_config(n, args, args.isa == "avx2") for n in names]
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, flags: {cpu_flags()}, isa={args.isa}")
    print(f"# {args.prompts} MATH500 prompts x {args.samples} samples, max {args.max_tokens} tokens, temperature 0.7, top_p {args.top_p}")
    if args.markdown:
        print("| isa | config | dtype | engine start s | generate s | output tokens | tokens/s | notes |")
        print("|---|---|---|---:|---:|---:|---:|---|")
    for r in results:
        if "error" in r:
            print(f"| {args.isa} | {r['config']} | error: {r['error']} |" if args.markdown else f"{r['config']}: ERROR {r['error']}")
        elif args.markdown:
            print(f"| {args.isa} | {r['config']} | {r['dtype']} | {r['start_s']:.1f} | {r['generate_s']:.1f} | {r['tokens']} | {r['tokens_per_s']:.0f} | {r['notes']} |")
        else:
            print(f"{r['config']}: dtype {r['dtype']}, start {r['start_s']:.1f}s, generate {r['generate_s']:.1f}s, {r['tokens']} tokens, {r['tokens_per_s']:.0f} tok/s  {r['notes']}")


if __name__ == "__main__":
    main()
