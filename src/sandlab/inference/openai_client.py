"""OpenAI-compatible chat-completions client (vLLM servers, OpenAI, other providers).

* async ``httpx`` with at most ``max_concurrency`` requests in flight (``asyncio.Semaphore``);
* client-side round-robin over several ``base_urls`` (each HTTP attempt goes to the next URL, so a
  retry also moves to another server);
* retries with exponential backoff and jitter on 429, 5xx, connection errors and timeouts, honouring
  ``Retry-After``; other 4xx are not retried;
* a request that still fails comes back as ``Completion(finish_reason="error")`` and the run goes on;
* the API key is read once from the environment variable named by ``api_key_env`` and is never
  logged, shown in ``repr`` or put into error messages.

``generate`` is synchronous: it runs its own event loop (in a worker thread when the caller is
already inside a running loop, e.g. a notebook).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import itertools
import logging
import os
import random
import time
from dataclasses import replace
from typing import Any

import httpx

from sandlab.config import BackendConfig, SamplingSettings
from sandlab.errors import BackendUnavailableError, ConfigError
from sandlab.inference.base import (
    ChatBackend,
    Completion,
    Conversation,
    ItemFailed,
    Row,
    error_completions,
    is_prefilled,
    one_line,
)
from sandlab.runs import SECRET_KEY_RE

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 300.0
MAX_BACKOFF_S = 60.0
# Request fields sandlab sets from a stage's sampling settings: teacher.extra_body may not override them.
SAMPLING_FIELDS = frozenset({"model", "messages", "n", "temperature", "top_p", "max_tokens", "seed", "stop", "stream", "response_format"})
HEALTH_TIMEOUT_S = 10.0


class _Secret:
    """Holds the API key; its repr/str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value or None

    def get(self) -> str | None:
        return self._value

    def __bool__(self) -> bool:
        return self._value is not None

    def __repr__(self) -> str:
        return "<secret set>" if self._value else "<secret unset>"

    __str__ = __repr__

    def __reduce__(self):  # never pickle the key into a subprocess or a file
        raise TypeError("the API key is not picklable; build the backend in the process that uses it")

    def __copy__(self) -> _Secret:
        return self

    def __deepcopy__(self, memo: dict) -> _Secret:
        return self


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class _RequestFailed(ItemFailed):
    def __init__(self, message: str, *, rejected: bool = False) -> None:
        super().__init__(message)
        self.rejected = rejected  # the server refused the request itself (HTTP 4xx other than 429): retrying cannot help


class OpenAICompatibleBackend(ChatBackend):
    """Chat completions from one or more OpenAI-compatible servers."""

    name = "openai"

    def __init__(
        self,
        model: str,
        base_urls: list[str] | str,
        *,
        api_key_env: str = BackendConfig.api_key_env,
        max_concurrency: int = BackendConfig.max_concurrency,
        timeout_s: float = BackendConfig.timeout_s,
        max_retries: int = BackendConfig.max_retries,
        retry_backoff_s: float = BackendConfig.retry_backoff_s,
        extra_body: dict[str, Any] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        clash = sorted(set(extra_body or {}) & SAMPLING_FIELDS)
        if clash:
            raise ConfigError(f"extra_body sets {clash}, which sandlab sends itself; set them in the stage's sampling settings instead")
        if isinstance(base_urls, str):
            base_urls = [base_urls]
        urls = [str(u).rstrip("/") for u in base_urls if str(u).strip()]
        if not urls:
            raise BackendUnavailableError("the openai backend needs base_urls=[http://host:port/v1, ...]; none given")
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise BackendUnavailableError(f"base URL {bad[0]!r} must start with http:// or https:// (e.g. http://host:8000/v1)")
        self.model = model
        self.base_urls = urls
        self.api_key_env = api_key_env
        self._api_key = _Secret(os.environ.get(api_key_env) if api_key_env else None)
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout_s = float(timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.retry_backoff_s = float(retry_backoff_s)
        self._rr = 0
        self._healthy_urls: list[str] | None = None  # set by the first health check
        self._is_vllm = False  # all healthy servers are vLLM: ask for per-choice token ids
        self.extra_body = dict(extra_body or {})
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        # Secret-looking request options (a provider's token in extra_body) are hidden like the API key.
        self._option_secrets = [str(v) for k, v in {**self.extra_body, **self.chat_template_kwargs}.items() if SECRET_KEY_RE.search(str(k)) and v]

    def __repr__(self) -> str:  # request options are left out: they may hold a provider's token
        key = "set" if self._api_key else "unset"
        return (
            f"OpenAICompatibleBackend(model={self.model!r}, base_urls={self.base_urls!r}, "
            f"api_key_env={self.api_key_env!r} ({key}), max_concurrency={self.max_concurrency})"
        )

    __str__ = __repr__

    # -- helpers --------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = self._api_key.get()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _redact(self, text: str) -> str:
        for secret in [self._api_key.get(), *self._option_secrets]:
            if secret and secret in text:
                text = text.replace(secret, "***")
        return text

    def _next_url(self) -> str:
        urls = self._healthy_urls or self.base_urls
        url = urls[self._rr % len(urls)]
        self._rr += 1
        return url

    def _run(self, coro_fn, *args: Any) -> Any:
        """Run ``coro_fn(*args)`` to completion from sync code, with or without a running loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coro_fn(*args))
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandlab-openai") as pool:
            return pool.submit(lambda: asyncio.run(coro_fn(*args))).result()

    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        return httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), limits=limits, headers=self._headers())

    # -- health -----------------------------------------------------------------------------------
    def check_health(self) -> list[str]:
        """``GET {url}/models`` on every base URL; raise BackendUnavailableError if none answers.

        Returns the URLs that answered (later requests only go to those).
        """
        return self._run(self._acheck_health)

    async def _probe(self, client: httpx.AsyncClient, url: str) -> tuple[str, str | None, dict | None]:
        """Return (url, problem or None, JSON body or None)."""
        try:
            resp = await client.get(f"{url}/models", timeout=min(self.timeout_s, HEALTH_TIMEOUT_S))
        except httpx.HTTPError as exc:
            return url, f"unreachable ({type(exc).__name__})", None
        if resp.status_code in (401, 403):
            return url, f"rejected the API key ({resp.status_code})", None
        try:
            body = resp.json() if resp.status_code == 200 else None
        except ValueError:
            body = None
        return url, None, body if isinstance(body, dict) else None

    async def _acheck_health(self) -> list[str]:
        async with self._client() as client:
            probes = await asyncio.gather(*(self._probe(client, url) for url in self.base_urls))
        healthy = [(url, body) for url, problem, body in probes if problem is None]
        problems = [(url, problem) for url, problem, _ in probes if problem is not None]
        if not healthy:
            url, problem = problems[0]
            if "API key" in problem:
                hint = f"set {self.api_key_env} to a valid key" if self.api_key_env else "configure an API key"
                raise BackendUnavailableError(f"teacher server {url} {problem}; {hint}")
            if len(problems) == 1:
                raise BackendUnavailableError(f"teacher server {url} is {problem}; start it or fix base_urls")
            listed = ", ".join(f"{u} ({p})" for u, p in problems)
            raise BackendUnavailableError(f"no teacher server answers: {listed}; start them or fix base_urls")
        for url, problem in problems:
            log.warning("teacher server %s is %s; sending requests to the other %d", url, problem, len(healthy))
        served: set[str] = set()
        vllm_flags = []
        for url, body in healthy:
            data = (body or {}).get("data") or []
            ids = {m.get("id") for m in data if isinstance(m, dict)}
            is_vllm = any(isinstance(m, dict) and m.get("owned_by") == "vllm" for m in data)
            vllm_flags.append(is_vllm)
            if is_vllm and ids and self.model not in ids:
                raise BackendUnavailableError(
                    f"teacher server {url} serves {sorted(ids)}, not {self.model!r}; set the backend's model to the "
                    "served name (--served-model-name)"
                )
            served |= ids
        if served and self.model not in served:
            log.warning("model %r is not listed by %s; requests may fail", self.model, self.base_urls)
        self._is_vllm = all(vllm_flags)
        self._healthy_urls = [url for url, _ in healthy]
        return list(self._healthy_urls)

    # -- requests ---------------------------------------------------------------------------------
    def _payload(self, conversation: Conversation, sampling: SamplingSettings, n: int, seed: int | None) -> dict:
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": conversation,
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if seed is not None:
            payload["seed"] = seed
        if sampling.stop:
            payload["stop"] = list(sampling.stop)
        if is_prefilled(conversation):
            payload["continue_final_message"] = True
            payload["add_generation_prompt"] = False
        payload.update(self.extra_body)  # e.g. reasoning_effort: high for gpt-oss
        if self.chat_template_kwargs:  # vLLM and SGLang servers pass them to the chat template
            payload["chat_template_kwargs"] = {**payload.get("chat_template_kwargs", {}), **self.chat_template_kwargs}
        if sampling.json_schema is not None:  # OpenAI structured outputs; vLLM and SGLang servers enforce it too
            payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "response", "schema": sampling.json_schema, "strict": True}}
        if self._is_vllm:
            payload["return_token_ids"] = True
        return payload

    def _backoff(self, attempt: int) -> float:
        return min(self.retry_backoff_s * (2**attempt), MAX_BACKOFF_S) * (0.5 + random.random())

    async def _post(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, payload: dict) -> dict:
        """POST with retries; return the JSON body or raise _RequestFailed with a one-line reason."""
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            url = self._next_url()
            retry_after: float | None = None
            async with sem:
                try:
                    resp = await client.post(f"{url}/chat/completions", json=payload)
                except httpx.HTTPError as exc:
                    last = f"{url}: {type(exc).__name__}{': ' + str(exc) if str(exc) else ''}"
                    resp = None
            if resp is not None:
                if resp.status_code == 200:
                    try:
                        body = resp.json()
                    except ValueError:
                        last = f"{url}: invalid JSON in the response"
                    else:
                        if isinstance(body, dict) and isinstance(body.get("choices"), list):
                            return body
                        last = f"{url}: response without choices"
                else:
                    detail = resp.text[:300].replace("\n", " ")
                    last = f"{url}: HTTP {resp.status_code}: {detail}"
                    if resp.status_code != 429 and resp.status_code < 500:
                        raise _RequestFailed(self._redact(last), rejected=True)
                    retry_after = _parse_retry_after(resp.headers.get("retry-after"))
            if attempt == self.max_retries:
                break
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            log.warning(
                "request failed (%s); retry %d/%d in %.2fs", self._redact(last), attempt + 1, self.max_retries, delay
            )
            await asyncio.sleep(delay)
        raise _RequestFailed(self._redact(f"gave up after {self.max_retries + 1} attempts: {last}"))

    @staticmethod
    def _split_tokens(total: int, choices: list[dict], max_tokens: int) -> list[int]:
        """Per-choice completion tokens when the server reports only the total (n > 1, non-vLLM)."""
        counts = [max_tokens if c.get("finish_reason") == "length" else 0 for c in choices]
        rest = max(total - sum(counts), 0)
        free = [i for i, c in enumerate(choices) if c.get("finish_reason") != "length"]
        weights = [max(len(_message_text(choices[i])), 1) for i in free]
        if free:
            shares = [rest * w // sum(weights) for w in weights]
            shares[-1] += rest - sum(shares)
            for i, share in zip(free, shares):
                counts[i] = share
        return counts

    def _parse(self, body: dict, max_tokens: int) -> list[Completion]:
        choices = sorted((c for c in body["choices"] if isinstance(c, dict)), key=lambda c: c.get("index", 0))
        usage = body.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        total = int(usage.get("completion_tokens") or 0)
        if all(isinstance(c.get("token_ids"), list) for c in choices):
            counts = [len(c["token_ids"]) for c in choices]
        elif len(choices) == 1:
            counts = [total]
        else:
            counts = self._split_tokens(total, choices, max_tokens)
        out = []
        for choice, count in zip(choices, counts):
            reason = choice.get("finish_reason") or "stop"
            if reason == "length":
                finish, error = "length", None
            elif reason in ("stop", "eos", "end_turn", "stop_sequence", "tool_calls"):
                finish, error = "stop", None
            elif reason == "content_filter":
                finish, error = "error", "the server's content filter stopped the completion"
            else:
                finish, error = "error", f"finish_reason {reason!r}"
            out.append(
                Completion(
                    text=_message_text(choice),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=count,
                    finish_reason=finish,
                    error=error,
                )
            )
        return out

    async def _one(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, conversation: Conversation, sampling: SamplingSettings
    ) -> list[Completion]:
        """``sampling.n`` samples, asking again for the rest when a server returns fewer."""
        got: list[Completion] = []
        try:
            for rounds in itertools.count():
                if len(got) >= sampling.n:
                    return got
                if rounds > sampling.n + self.max_retries:
                    raise _RequestFailed(f"the server returned only {len(got)} of {sampling.n} samples")
                seed = sampling.seed + len(got) if (sampling.seed is not None and got) else sampling.seed
                body = await self._post(client, sem, self._payload(conversation, sampling, sampling.n - len(got), seed))
                got += self._parse(body, sampling.max_tokens)
        except Exception as exc:  # noqa: BLE001 (never fail the batch for one item)
            failed = exc if isinstance(exc, _RequestFailed) else _RequestFailed(self._redact(one_line(exc)))
            if not got:
                raise failed from None
            log.warning("chat completion failed: %s", failed)
            return got + error_completions(sampling.n - len(got), str(failed))

    async def _agenerate(self, conversations: list[Conversation], sampling: SamplingSettings, desc: str, seeds: list[int | None]) -> list[Row]:
        if self._healthy_urls is None:
            await self._acheck_health()
        from tqdm.auto import tqdm  # noqa: PLC0415

        sem = asyncio.Semaphore(self.max_concurrency)
        async with self._client() as client:
            with tqdm(total=len(conversations), desc=desc, unit="conv", dynamic_ncols=True) as bar:

                async def run(index: int, conv: Conversation) -> list[Completion]:
                    try:
                        return await self._one(client, sem, conv, replace(sampling, seed=seeds[index]))
                    finally:
                        bar.update(1)

                return list(await asyncio.gather(*(run(i, c) for i, c in enumerate(conversations)), return_exceptions=True))

    def _generate(self, conversations: list[Conversation], sampling: SamplingSettings, *, desc: str,
                  seeds: list[int | None]) -> list[Row]:
        rows = self._run(self._agenerate, conversations, sampling, desc, seeds)
        # Every request refused for the same reason (an extra_body key the server does not know, a bad
        # sampling value): a setting is wrong, not an item; stop with the server's message.
        reasons = {str(r).split(": ", 1)[-1] for r in rows if isinstance(r, _RequestFailed) and r.rejected}
        if len(rows) > 1 and len(reasons) == 1 and all(isinstance(r, _RequestFailed) and r.rejected for r in rows):
            raise BackendUnavailableError(f"the server refused all {len(rows)} requests: {str(rows[0])}; check the teacher's request options "
                                          "(extra_body, chat_template_kwargs) and the stage's sampling settings")
        return rows


def _message_text(choice: dict) -> str:
    """The reply text; a trace split off by a server-side reasoning parser goes back in ``<think>`` tags,
    so the full reasoning reaches the data stages and graders like an in-process engine's output."""
    message = choice.get("message") or {}
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        return f"<think>\n{reasoning}\n</think>\n\n{content or ''}"
    return content or ""
