"""vLLM-CPU settings chosen from the CPU's capabilities (pure decisions; the engine tests check them live)."""

from __future__ import annotations

import json

import pytest

from sandlab.errors import BackendUnavailableError
from sandlab.inference.cpu_settings import CpuInfo, check_memory, choose_cpu_settings, weights_bytes

GiB = 1024**3
AVX2_2 = CpuInfo(arch="x86", isa="avx2", native_bf16=False, cores=(0, 1))
AMX_2 = CpuInfo(arch="x86", isa="amx", native_bf16=True, cores=(0, 1))
AMX_32 = CpuInfo(arch="x86", isa="amx", native_bf16=True, cores=tuple(range(32)))


def choose(info, dtype="bfloat16", kwargs=None, environ=None, available=20 * GiB):
    return choose_cpu_settings(info, dtype, dict(kwargs or {}), environ=environ or {}, available_bytes=available)


def test_avx2_only_runs_float32_on_all_cores():
    settings = choose(AVX2_2)
    assert settings.dtype == "float32"
    assert settings.env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert "AVX2 only" in settings.summary and "float32" in settings.summary and "\n" not in settings.summary


def test_native_bf16_keeps_bfloat16_and_float32_stays():
    assert choose(AMX_2).dtype == "bfloat16"
    assert choose(AVX2_2, dtype="float32").dtype == "float32"
    assert choose(CpuInfo(arch="x86", isa="avx512", native_bf16=False, cores=(0, 1))).dtype == "float32"


def test_many_cores_keep_vllms_own_binding():
    settings = choose(AMX_32)
    assert settings.env == {} and "vLLM's thread binding" in settings.summary


@pytest.mark.parametrize("environ", [{"VLLM_CPU_OMP_THREADS_BIND": "0"}, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}])
def test_users_thread_settings_win(environ):
    settings = choose(AVX2_2, environ=environ)
    assert settings.env == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_users_process_setting_wins_and_auto_off_leaves_everything_to_vllm():
    assert choose(AVX2_2, environ={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}).env == {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert choose(AVX2_2, environ={"SANDLAB_CPU_AUTO": "0"}).env == {}


def test_kv_cache_size_from_available_memory_or_as_given():
    assert choose(AMX_2, available=20 * GiB).engine_kwargs["kv_cache_memory_bytes"] == int(0.15 * 20 * GiB)
    assert choose(AMX_2, available=1 * GiB).engine_kwargs["kv_cache_memory_bytes"] == 512 * 1024**2  # floor
    assert choose(AMX_2, available=200 * GiB).engine_kwargs["kv_cache_memory_bytes"] == 8 * GiB  # cap
    assert choose(AMX_2, kwargs={"kv_cache_memory_bytes": 123}).engine_kwargs["kv_cache_memory_bytes"] == 123
    from_env = choose(AMX_2, environ={"VLLM_CPU_KVCACHE_SPACE": "2"})
    assert "kv_cache_memory_bytes" not in from_env.engine_kwargs and from_env.kv_cache_bytes == 2 * GiB
    with pytest.raises(BackendUnavailableError, match="VLLM_CPU_KVCACHE_SPACE='lots' is not a number"):
        choose(AMX_2, environ={"VLLM_CPU_KVCACHE_SPACE": "lots"})
    assert choose(AMX_2).engine_kwargs["enable_chunked_prefill"] is False


def test_cpu_without_avx2_is_one_line():
    with pytest.raises(BackendUnavailableError, match="needs a CPU with AVX2.*backend=hf"):
        choose(CpuInfo(arch="x86", isa="none", native_bf16=False, cores=(0,)))


def test_memory_check_counts_weights_in_the_run_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    assert weights_bytes(str(tmp_path), "bfloat16") == 1000
    assert weights_bytes(str(tmp_path), "float32") == 2000
    assert weights_bytes(str(tmp_path / "missing"), "float32") is None
    settings = choose(AVX2_2, kwargs={"kv_cache_memory_bytes": 2 * GiB})
    check_memory(str(tmp_path), settings, available_bytes=4 * GiB)  # 2 GiB KV + 1 GiB runtime fits
    with pytest.raises(BackendUnavailableError, match=r"needs about 3\.0 GiB .* 2\.5 GiB of RAM is free"):
        check_memory(str(tmp_path), settings, available_bytes=int(2.5 * GiB))
