"""A real OpenAI-compatible HTTP server on 127.0.0.1 whose replies come from a Python function: it
stands in for a teacher, judge or student that can do the task (such a model does not fit on a CPU
test runner), while everything on the client side (HTTP client, retries, stages) runs for real.

Responders tell the data stages' requests apart with ``prompt_of``: the name of the
``data_gen/prompts/*.txt`` template a request was made from and the fields filled into it, so they
do not depend on a template's wording.
"""

from __future__ import annotations

import functools
import json
import re
import string
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PROMPTS = Path(__file__).resolve().parents[1] / "data_gen" / "prompts"

Reply = tuple[int, dict, dict]  # (status, headers, JSON body)


@functools.cache
def _templates() -> list[tuple[str, re.Pattern]]:
    """(name, pattern) of every prompt template, the most specific (most literal text) first."""
    found = []
    for path in PROMPTS.glob("*.txt"):
        pattern, literal, seen = "", 0, set()
        for text, field, _spec, _conversion in string.Formatter().parse(path.read_text()):
            pattern += re.escape(text)
            literal += len(text)
            if field is not None:
                pattern += f"(?P={field})" if field in seen else f"(?P<{field}>.*?)"
                seen.add(field)
        found.append((literal, path.stem, re.compile(pattern, re.DOTALL)))
    return [(name, regex) for _literal, name, regex in sorted(found, key=lambda t: -t[0])]


def prompt_of(body: dict) -> tuple[str | None, dict[str, str]]:
    """The prompt template (file stem) the request's last user message was formatted from, and its fields."""
    text = next((m["content"] for m in reversed(body["messages"]) if m.get("role") == "user"), "")
    for name, regex in _templates():
        match = regex.fullmatch(text)
        if match:
            return name, match.groupdict()
    return None, {}


def completion_body(texts: list[str]) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"} for i, t in enumerate(texts)]
    return {"id": "x", "object": "chat.completion", "model": "stub", "choices": choices,
            "usage": {"prompt_tokens": 20, "completion_tokens": 10 * len(texts)}}


class _Server(ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: under a loaded CI machine, a client's 32 concurrent
    # connections overflow it and some are reset (ReadError), so a test sees failed requests it did not script.
    request_queue_size = 256


def hello(body: dict) -> list[str]:
    return [f"hello {i}" for i in range(body.get("n", 1))]


class ChatStub:
    """``respond(body)`` gives the reply texts (one per sample) or a whole ``(status, headers, body)``
    reply; ``script`` replies come first, one per request (a ``None`` body: ``respond``'s answer).
    ``requests`` counts the chat requests, ``received`` keeps each one's path, headers and body."""

    def __init__(self, respond: Callable[[dict], list[str] | Reply] = hello, *, script: list[Reply] | None = None, delay_s: float = 0.0):
        self.requests = 0
        self.received: list[dict[str, Any]] = []
        self.script = list(script or [])
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, headers: dict, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send(200, {}, {"object": "list", "data": [{"id": "stub", "object": "model", "owned_by": "stub"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with stub._lock:
                    stub.requests += 1
                    stub.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status, headers, reply = stub.script.pop(0) if stub.script else (200, {}, None)
                time.sleep(delay_s)
                if reply is None:
                    answer = respond(body)
                    status, headers, reply = answer if isinstance(answer, tuple) else (200, {}, completion_body(answer))
                self._send(status, headers, reply)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> ChatStub:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
