"""The one interface every inference backend implements.

A backend turns a batch of chat conversations into ``n`` completions per conversation.
Backends never raise for a single failed item: a request that keeps failing comes back as a
``Completion`` with ``finish_reason="error"`` so long jobs record it and go on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

Message = dict[str, str]
Conversation = list[Message]


@dataclass
class SamplingConfig:
    """Sampling settings for one ``generate`` call.

    ``seed`` is a base seed: conversation ``i`` of the call is sampled with ``seed + i`` (see
    ``request_seed``), so identical prompts in one batch still get different samples while a rerun of
    the same batch reproduces them.
    """

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int | None = 0
    stop: list[str] = field(default_factory=list)


def request_seed(sampling: SamplingConfig, index: int) -> int | None:
    return None if sampling.seed is None else sampling.seed + index


def sampling_from(settings: object, *, n: int, offset: int = 0) -> SamplingConfig:
    """A SamplingConfig from recipe settings, with ``n`` samples and the base seed moved by ``offset``
    (the position of the batch's first record in its stage), so sharded runs sample like whole ones."""
    sampling = SamplingConfig(**{**vars(settings), "n": n})
    sampling.seed = request_seed(sampling, offset)
    return sampling


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


class ChatBackend(ABC):
    """Generates chat completions for a batch of conversations."""

    name: str = "backend"

    @abstractmethod
    def generate(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingConfig,
        *,
        desc: str = "generate",
    ) -> list[list[Completion]]:
        """Return, for each conversation, ``sampling.n`` completions in a stable order."""

    def close(self) -> None:
        """Release engine/server resources."""

    def __enter__(self) -> ChatBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
