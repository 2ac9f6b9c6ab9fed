"""A real OpenAI-compatible HTTP server on 127.0.0.1 whose replies come from a Python function: it
stands in for a teacher, judge or student that can do the task (such a model does not fit on a CPU
test runner), while everything on the client side (HTTP client, retries, stages) runs for real."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatStub:
    """``respond(body) -> list of reply texts`` (one per sample); counts requests."""

    def __init__(self, respond: Callable[[dict], list[str]], *, delay_s: float = 0.0):
        self.requests = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                self._send({"object": "list", "data": [{"id": "stub", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.requests += 1
                time.sleep(delay_s)
                texts = respond(body)
                choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"} for i, t in enumerate(texts)]
                self._send({"id": "x", "object": "chat.completion", "choices": choices, "usage": {"prompt_tokens": 20, "completion_tokens": 10 * len(texts)}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
