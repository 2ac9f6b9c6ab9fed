"""Build a ChatBackend from a ``BackendConfig`` (dataclass or OmegaConf DictConfig)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from sandlab.errors import ConfigError
from sandlab.inference.base import ChatBackend

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "openai", "hf")
HF_EXTRA_ARGS = ("batch_size", "device")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        value = cfg.get(key, default)
    else:
        value = getattr(cfg, key, default)
    return default if value is None and default is not None else value


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain Python (lists/dicts) so backends and vLLM get ordinary types."""
    try:
        from omegaconf import OmegaConf  # noqa: PLC0415

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


def build_backend(cfg: Any, *, what: str = "backend.model") -> ChatBackend:
    """Create the backend named by ``cfg.backend`` (vllm | openai | hf).

    ``what`` names the config key in error messages (e.g. ``teacher.model``).
    """
    from sandlab.models import resolve_model_path  # noqa: PLC0415

    kind = str(_get(cfg, "backend", "vllm")).lower()
    if kind not in BACKENDS:
        raise ConfigError(f"backend={kind!r} is not one of {list(BACKENDS)}")
    model = _get(cfg, "model")
    if not model:
        raise ConfigError(f"{what} is empty; set it to a model path/Hub id (or the served name for openai)")
    extra = dict(_plain(_get(cfg, "extra_engine_args", {})) or {})
    chat_template = _get(cfg, "chat_template")

    if kind == "openai":
        from sandlab.inference.openai_client import OpenAICompatibleBackend  # noqa: PLC0415

        base_urls = list(_plain(_get(cfg, "base_urls", [])) or [])
        endpoints_file = _get(cfg, "endpoints_file")
        if not base_urls and endpoints_file:  # servers in a Slurm job write their URLs there
            from sandlab.inference.endpoints import wait_for_endpoints  # noqa: PLC0415

            base_urls = wait_for_endpoints(endpoints_file, int(_get(cfg, "endpoints_count", 1)), float(_get(cfg, "endpoints_wait_s", 3600.0)))
        if not base_urls:
            raise ConfigError("backend=openai needs base_urls=[http://host:port/v1, ...] or endpoints_file")
        if chat_template:
            log.warning("chat_template is ignored by the openai backend; start the server with --chat-template instead")
        if extra:
            log.warning("extra_engine_args %s are ignored by the openai backend", sorted(extra))
        return OpenAICompatibleBackend(
            str(model),
            base_urls,
            api_key_env=_get(cfg, "api_key_env", "OPENAI_API_KEY"),
            max_concurrency=int(_get(cfg, "max_concurrency", 32)),
            timeout_s=float(_get(cfg, "timeout_s", 600.0)),
            max_retries=int(_get(cfg, "max_retries", 5)),
            retry_backoff_s=float(_get(cfg, "retry_backoff_s", 1.0)),
        )

    path = resolve_model_path(str(model), what=what)
    if kind == "hf":
        from sandlab.inference.hf_generate import TransformersBackend  # noqa: PLC0415

        unknown = sorted(set(extra) - set(HF_EXTRA_ARGS))
        if unknown:
            raise ConfigError(f"extra_engine_args {unknown} are not supported by the hf backend; allowed: {list(HF_EXTRA_ARGS)}")
        return TransformersBackend(
            path,
            dtype=str(_get(cfg, "dtype", "auto")),
            chat_template=chat_template,
            **extra,
        )

    from sandlab.inference.vllm_engine import VLLMEngineBackend  # noqa: PLC0415

    kwargs: dict[str, Any] = dict(
        tensor_parallel_size=int(_get(cfg, "tensor_parallel_size", 1)),
        data_parallel_size=int(_get(cfg, "data_parallel_size", 1)),
        max_model_len=int(_get(cfg, "max_model_len", 4096)),
        gpu_memory_utilization=float(_get(cfg, "gpu_memory_utilization", 0.9)),
        dtype=str(_get(cfg, "dtype", "bfloat16")),
        chat_template=chat_template,
        enforce_eager=bool(_get(cfg, "enforce_eager", False)),
    )
    kwargs.update(extra)  # extra_engine_args go to vllm.LLM as is (and may override the above)
    return VLLMEngineBackend(path, **kwargs)
