"""Build a ChatBackend from a ``BackendConfig``: the dataclass, an OmegaConf DictConfig or a plain
mapping; keys it leaves out take the schema's defaults (``sandlab.config.BackendConfig``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sandlab.config import BACKENDS, BackendConfig
from sandlab.errors import ConfigError
from sandlab.inference.base import ChatBackend

log = logging.getLogger(__name__)

HF_EXTRA_ARGS = ("batch_size", "device")


def backend_config(cfg: BackendConfig | Mapping[str, Any] | Any) -> BackendConfig:
    """``cfg`` as a typed ``BackendConfig`` (the schema fills in what it leaves out and checks types)."""
    if isinstance(cfg, BackendConfig):
        return cfg
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BackendConfig), cfg))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"invalid backend value{f' at {key}' if key else ''}: {str(exc).splitlines()[0]}") from None


def build_backend(cfg: BackendConfig | Mapping[str, Any] | Any, *, what: str = "backend.model") -> ChatBackend:
    """Create the backend named by ``cfg.backend`` (one of ``BACKENDS``).

    ``what`` names the config key in error messages (e.g. ``teacher.model``).
    """
    from sandlab.models import resolve_model_path  # noqa: PLC0415

    cfg = backend_config(cfg)
    kind = cfg.backend.lower()
    if kind not in BACKENDS:
        raise ConfigError(f"backend={kind!r} is not one of {list(BACKENDS)}")
    if not cfg.model:
        raise ConfigError(f"{what} is empty; set it to a model path/Hub id (or the served name for openai)")
    extra = dict(cfg.extra_engine_args)

    if kind == "openai":
        from sandlab.inference.openai_client import OpenAICompatibleBackend  # noqa: PLC0415

        base_urls = list(cfg.base_urls)
        if not base_urls and cfg.endpoints_file:  # servers in a Slurm job write their URLs there
            from sandlab.inference.endpoints import wait_for_endpoints  # noqa: PLC0415

            base_urls = wait_for_endpoints(cfg.endpoints_file, cfg.endpoints_count, cfg.endpoints_wait_s)
        if not base_urls:
            raise ConfigError("backend=openai needs base_urls=[http://host:port/v1, ...] or endpoints_file")
        if cfg.chat_template:
            log.warning("chat_template is ignored by the openai backend; start the server with --chat-template instead")
        if extra:
            log.warning("extra_engine_args %s are ignored by the openai backend", sorted(extra))
        return OpenAICompatibleBackend(
            cfg.model,
            base_urls,
            api_key_env=cfg.api_key_env,
            max_concurrency=cfg.max_concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            retry_backoff_s=cfg.retry_backoff_s,
            extra_body=dict(cfg.extra_body),
            chat_template_kwargs=dict(cfg.chat_template_kwargs),
        )

    path = resolve_model_path(cfg.model, what=what)
    if kind == "hf":
        from sandlab.inference.hf_generate import TransformersBackend  # noqa: PLC0415

        unknown = sorted(set(extra) - set(HF_EXTRA_ARGS))
        if unknown:
            raise ConfigError(f"extra_engine_args {unknown} are not supported by the hf backend; allowed: {list(HF_EXTRA_ARGS)}")
        if cfg.extra_body:
            raise ConfigError(f"extra_body {sorted(cfg.extra_body)} is for OpenAI-compatible servers and the vllm backend; the hf backend has no request body")
        return TransformersBackend(path, dtype=cfg.dtype, chat_template=cfg.chat_template, chat_template_kwargs=dict(cfg.chat_template_kwargs), **extra)

    from sandlab.inference.vllm_engine import VLLMEngineBackend  # noqa: PLC0415

    kwargs: dict[str, Any] = dict(
        tensor_parallel_size=cfg.tensor_parallel_size,
        data_parallel_size=cfg.data_parallel_size,
        max_model_len=cfg.max_model_len,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        dtype=cfg.dtype,
        chat_template=cfg.chat_template,
        enforce_eager=cfg.enforce_eager,
    )
    kwargs.update(extra)  # extra_engine_args go to vllm.LLM as is (and may override the above)
    return VLLMEngineBackend(path, request_options=engine_request_options(cfg), **kwargs)


def engine_request_options(cfg: BackendConfig) -> dict[str, Any]:
    """What of ``extra_body`` and ``chat_template_kwargs`` the in-process engine can honour: SamplingParams
    fields (top_k, min_p, ...) and the chat template's variables; reasoning_effort is such a variable
    (gpt-oss's template reads it). Anything else stops with one line rather than being dropped."""
    from vllm import SamplingParams  # noqa: PLC0415

    fields = set(getattr(SamplingParams, "__struct_fields__", ())) or set(SamplingParams.__init__.__code__.co_varnames)
    body = dict(cfg.extra_body)
    template_kwargs = dict(cfg.chat_template_kwargs)
    if "reasoning_effort" in body:
        template_kwargs.setdefault("reasoning_effort", body.pop("reasoning_effort"))
    managed = {"n", "temperature", "top_p", "max_tokens", "seed", "stop", "structured_outputs", "guided_decoding"}
    unknown = sorted(k for k in body if k not in fields or k in managed)
    if unknown:
        raise ConfigError(f"extra_body {unknown} has no meaning for the in-process vLLM engine (it takes SamplingParams fields such as "
                          "top_k or min_p, and reasoning_effort); the sampling settings come from each stage's sampling")
    return {"sampling": body, "chat_template_kwargs": template_kwargs}
