"""A small real HTTP server (stdlib ``http.server`` in a thread) that answers from a script.

Tests register a handler per ``(method, path)``; every request is recorded (method, path, query, headers,
body, arrival time) so a test asserts on what really went over the wire. No mocking of httpx.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict/list -> JSON; str/bytes as is; an iterable of bytes -> streamed, then close
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Handler = Callable[[Recorded, int], Reply]


def error_reply(
    status: int, code: str, message: str, details: list[Any] | None = None, /, **headers: str
) -> Reply:
    return Reply(
        status, {"error": {"code": code, "message": message, "details": details or []}}, headers=dict(headers)
    )


class ScriptedServer:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, method: str, path: str, handler: Handler | Reply | list[Reply]) -> None:
        """Register a handler; a Reply answers always; a list of Replies answers in turn (last repeats)."""
        if isinstance(handler, Reply):
            reply = handler
            self.routes[(method, path)] = lambda req, n: reply
        elif isinstance(handler, list):
            replies = handler
            self.routes[(method, path)] = lambda req, n: replies[min(n, len(replies) - 1)]
        else:
            self.routes[(method, path)] = handler

    def calls(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == path]

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                req = Recorded(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    at=time.monotonic(),
                )
                with server._lock:
                    n = len(server.calls(req.method, req.path))
                    server.requests.append(req)
                handler = server.routes.get((req.method, req.path))
                if handler is None:
                    reply = error_reply(404, "not_found", f"no route {req.method} {req.path}")
                else:
                    reply = handler(req, n)
                if reply.delay:
                    time.sleep(reply.delay)
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                headers = {"x-request-id": f"req_{len(server.requests)}", **reply.headers}
                body = reply.body
                stream: Iterable[bytes] | None = None
                if isinstance(body, dict | list):
                    payload = json.dumps(body).encode()
                    headers.setdefault("Content-Type", "application/json")
                elif isinstance(body, str):
                    payload = body.encode()
                elif isinstance(body, bytes):
                    payload = body
                elif body is None:
                    payload = b""
                else:
                    payload = b""
                    stream = body
                self.send_response(reply.status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if stream is None:
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    if stream is None:
                        self.wfile.write(payload)
                    else:
                        for chunk in stream:
                            self.wfile.write(chunk)
                            self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            do_GET = do_POST = do_DELETE = do_PUT = _handle

        return _Handler


@contextmanager
def scripted_server() -> Iterator[ScriptedServer]:
    server = ScriptedServer().start()
    try:
        yield server
    finally:
        server.stop()


def job_body(job_id: str = "job_1", status: str = "queued", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": job_id,
        "object": "job",
        "name": None,
        "method": "sft",
        "status": status,
        "stage": None,
        "base_model": "model_1",
        "datasets": {"sft": "ds_1"},
        "hyperparameters": {},
        "lora": None,
        "seed": 0,
        "progress": 0.0,
        "error": None,
        "created_at": 1_700_000_000,
        "started_at": None,
        "finished_at": None,
    }
    body.update(extra)
    return body


def model_body(model_id: str = "model_1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "name": "tiny",
        "architecture": "LlamaForCausalLM",
        "num_parameters": 1000,
        "size_bytes": 4000,
        "status": "ready",
        "created_at": 1_700_000_000,
    }
    body.update(extra)
    return body
