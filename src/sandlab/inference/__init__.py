"""Inference backends: in-process vLLM, OpenAI-compatible servers, transformers fallback.

Backends import their heavy dependencies lazily; ``build_backend`` picks one from a config.
"""

from sandlab.inference.base import ChatBackend, Completion, Conversation, Message, SamplingConfig
from sandlab.inference.factory import build_backend

__all__ = ["ChatBackend", "Completion", "Conversation", "Message", "SamplingConfig", "build_backend"]
