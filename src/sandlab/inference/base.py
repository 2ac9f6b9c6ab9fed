"""The one contract every inference backend follows.

A backend turns a batch of chat conversations into ``sampling.n`` completions per conversation.
``ChatBackend.generate`` does what is the same for every backend: an empty batch, greedy decoding
with ``n > 1`` (one sample, repeated), filling rows the engine left short, and turning an item that
failed into ``Completion(finish_reason="error")`` with a one-line error, so long jobs record it and
go on. A backend implements only the engine call, ``_generate``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from sandlab.config import SamplingSettings
from sandlab.errors import BackendUnavailableError
from sandlab.models import looks_like_local_path

log = logging.getLogger(__name__)

Message = dict[str, str]
Conversation = list[Message]
T = TypeVar("T")


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.finish_reason != "error"

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


Row = list[Completion] | BaseException  # what ``_generate`` returns per conversation


class ItemFailed(Exception):
    """One item failed; its message is the completion's error text as it is."""


def request_seed(sampling: SamplingSettings, index: int) -> int | None:
    """Conversation ``index`` of a call is sampled with ``seed + index``."""
    return None if sampling.seed is None else sampling.seed + index


def sampling_from(settings: SamplingSettings, *, n: int, offset: int = 0) -> SamplingSettings:
    """``settings`` with ``n`` samples and the base seed moved by ``offset`` (the position of the
    batch's first record in its stage), so sharded runs sample like whole ones."""
    return replace(settings, n=n, seed=request_seed(settings, offset))


def is_prefilled(conversation: Conversation) -> bool:
    """A conversation whose last message is an assistant turn is continued, not answered."""
    return bool(conversation) and conversation[-1].get("role") == "assistant"


def one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    if isinstance(exc, ItemFailed):
        return lines[0] if lines else "failed"
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def error_completions(n: int, message: str) -> list[Completion]:
    return [Completion(text="", finish_reason="error", error=message) for _ in range(n)]


def check_model_files(model: str, chat_template: str | None, engine: str) -> None:
    """Stop with one line, before an engine loads anything, when a local model or the chat template is missing."""
    path = Path(model).expanduser()
    if looks_like_local_path(model) and not path.exists():
        raise BackendUnavailableError(
            f"{engine} model path {model!r} does not exist; point the backend's model at a checkpoint directory or a Hub id"
        )
    if path.is_dir() and not (path / "config.json").exists():
        raise BackendUnavailableError(f"{engine} model path {model!r} has no config.json; point it at a model checkpoint")
    if chat_template is not None and not Path(chat_template).expanduser().is_file():
        raise BackendUnavailableError(
            f"chat_template {chat_template!r} is not a file; give the path of a .jinja chat template or leave it unset"
        )


def isolate(items: list[T], call: Callable[[list[T]], list[Row]], what: str) -> list[Row]:
    """``call(items)``; when it raises, split the batch in halves until the failing items stand alone,
    and give those as their exception (``BackendUnavailableError`` is never an item's fault: it stops)."""
    try:
        return call(items)
    except BackendUnavailableError:
        raise
    except Exception as exc:  # noqa: BLE001 (one bad item must not fail the batch)
        if len(items) == 1:
            return [exc]
        log.warning("%s failed for a batch of %d (%s); retrying it in halves", what, len(items), one_line(exc))
    mid = len(items) // 2
    return isolate(items[:mid], call, what) + isolate(items[mid:], call, what)


class ChatBackend(ABC):
    """Generates chat completions for a batch of conversations."""

    name: str = "backend"
    closed: bool = False

    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingSettings,
        *,
        desc: str = "generate",
        seeds: Sequence[int | None] | None = None,
    ) -> list[list[Completion]]:
        """For each conversation, ``sampling.n`` completions in a stable order; conversation ``i`` is
        sampled with seed ``sampling.seed + i``, or with ``seeds[i]`` when given (a caller that samples a
        subset of its items keeps each item's own seed). Never raises for one failed item."""
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        convs = [list(c) for c in conversations]
        if not convs:
            return []
        repeat = sampling.temperature == 0 and sampling.n > 1  # greedy: one sample, repeated
        request = replace(sampling, n=1) if repeat else sampling
        if seeds is not None and len(seeds) != len(convs):
            raise ValueError(f"{len(seeds)} seeds for {len(convs)} conversations")
        per_conversation = list(seeds) if seeds is not None else [request_seed(sampling, i) for i in range(len(convs))]
        rows = self._generate(convs, request, desc=desc, seeds=per_conversation)
        if len(rows) != len(convs):
            raise BackendUnavailableError(f"the {self.name} backend returned {len(rows)} rows for {len(convs)} conversations")
        results = [self._full_row(row, request.n) for row in rows]
        return [[replace(r[0]) for _ in range(sampling.n)] for r in results] if repeat else results

    def _full_row(self, row: Row, n: int) -> list[Completion]:
        if isinstance(row, BaseException):
            log.warning("%s request failed: %s", self.name, one_line(row))
            return error_completions(n, one_line(row))
        row = list(row[:n])
        return row + error_completions(n - len(row), f"the {self.name} backend returned {len(row)} of {n} samples")

    @abstractmethod
    def _generate(self, conversations: list[Conversation], sampling: SamplingSettings, *, desc: str,
                  seeds: list[int | None]) -> list[Row]:
        """The engine call: per conversation, up to ``sampling.n`` completions (fewer are filled with
        errors) or the exception that failed it; conversation ``i`` is sampled with ``seeds[i]``
        (``sampling.seed`` is only the first of them). Greedy calls arrive with ``n == 1``."""

    def close(self) -> None:
        """Release engine/server resources; later ``generate`` calls raise."""
        self.closed = True

    def __enter__(self) -> ChatBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
