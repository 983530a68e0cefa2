"""A tiny real OpenAI-compatible HTTP server (stdlib ``http.server`` in a thread) whose replies come from a Python
function: scripted judges and candidates for tests that run the real eval code path through the official
``openai`` client. It records every request (path, headers, body) and can fail the first attempts with a status."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from typing import Any, Callable, Iterator

Reply = Callable[[str, list[dict[str, str]]], str]  # (model, messages) -> text


class ScriptedServer:
    """``base_url`` (``http://127.0.0.1:PORT/v1``), ``requests`` (every attempt), ``fail_first`` (status codes
    returned to the first attempts, in order: e.g. ``[503, 429]``)."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.fail_first: list[int] = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    status = server.fail_first.pop(0) if server.fail_first else 200
                if status != 200:
                    self._send(status, {"error": {"message": "scripted failure", "type": "server_error"}})
                    return
                text = server.reply(body["model"], body["messages"])
                self._send(200, {
                    "id": "cmpl-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": max(len(text.split()), 1),
                              "total_tokens": 2}})

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answered(self, model: str | None = None) -> int:
        """Successful completions served (optionally for one model name)."""
        return sum(1 for r in self.requests if model is None or r["body"]["model"] == model)


@contextlib.contextmanager
def scripted_server(reply: Reply) -> Iterator[ScriptedServer]:
    """Run a ``ScriptedServer`` for the duration of the block."""
    server = ScriptedServer(reply)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(timeout=5)
