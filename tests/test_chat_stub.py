"""The test server itself: a client's concurrent requests reach it even while it is slow to accept."""

from __future__ import annotations

import socket
from http.server import BaseHTTPRequestHandler

import chat_stub

from sandlab.config import BackendConfig


def test_the_stub_takes_more_pending_connections_than_a_client_opens():
    """A server that accepts nothing (as when its thread waits for the GIL on a loaded machine) still
    completes every handshake of a client's ``max_concurrency`` connections and some more; with
    socketserver's default backlog of 5 the sixth or seventh connect times out."""
    server = chat_stub._Server(("127.0.0.1", 0), BaseHTTPRequestHandler)
    sockets: list[socket.socket] = []
    try:
        for _ in range(BackendConfig().max_concurrency + 8):
            sockets.append(socket.create_connection(server.server_address, timeout=0.5))  # raises TimeoutError when dropped
    finally:
        for s in sockets:
            s.close()
        server.server_close()
