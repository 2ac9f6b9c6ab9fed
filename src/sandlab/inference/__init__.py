"""Inference backends: in-process vLLM, OpenAI-compatible servers, transformers fallback.

Backends import their heavy dependencies lazily; ``build_backend`` picks one from a config. Every
backend follows ``ChatBackend`` (``sandlab.inference.base``); sampling is ``sandlab.config.SamplingSettings``.
"""

from sandlab.inference.base import ChatBackend, Completion, Conversation, Message
from sandlab.inference.factory import build_backend

__all__ = ["ChatBackend", "Completion", "Conversation", "Message", "build_backend"]
