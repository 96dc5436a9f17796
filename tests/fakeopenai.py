"""A fake OpenAI-compatible completions server on 127.0.0.1 for engine and CLI tests."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        pass  # clients that time out or drop are part of the script


class FakeServer:
    """An OpenAI-style completions server whose misbehaviour is scripted per HTTP request.

    Actions: ``ok``; ``status:CODE`` (error response); ``429:SECONDS`` (with Retry-After);
    ``hang:SECONDS`` (sleep, then answer); ``drop`` (close the socket without answering).
    ``script`` is consumed in arrival order; ``by_prompt[prompt]`` takes precedence.
    """

    def __init__(self, script=(), by_prompt=None, delay: float = 0.0, shared=None) -> None:  # type: ignore[no-untyped-def]
        self.script = list(script)
        self.by_prompt = {k: list(v) for k, v in (by_prompt or {}).items()}
        self.delay = delay
        self.lock = threading.Lock()
        self.attempts: list[tuple[float, str, dict]] = []
        self.shared = shared if shared is not None else {"inflight": 0, "max_inflight": 0}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # type: ignore[no-untyped-def]
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                action = server._next(body)
                with server.lock:
                    server.shared["inflight"] += 1
                    server.shared["max_inflight"] = max(
                        server.shared["max_inflight"], server.shared["inflight"]
                    )
                try:
                    server._handle(self, action, body)
                finally:
                    with server.lock:
                        server.shared["inflight"] -= 1

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _next(self, body: dict) -> str:
        with self.lock:
            queue = self.by_prompt.get(body.get("prompt"))
            action = (queue.pop(0) if queue else "ok") if queue is not None else None
            if action is None:
                action = self.script.pop(0) if self.script else "ok"
            self.attempts.append((time.monotonic(), action, body))
            return action

    def _handle(self, h: BaseHTTPRequestHandler, action: str, body: dict) -> None:
        if self.delay:
            time.sleep(self.delay)
        kind, _, arg = action.partition(":")
        if kind == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "hang":
            time.sleep(float(arg))
        if kind in ("status", "429"):
            code = 429 if kind == "429" else int(arg)
            h.send_response(code)
            if kind == "429":
                h.send_header("Retry-After", arg)
            payload = json.dumps({"error": {"message": f"scripted {code}"}}).encode()
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        payload = json.dumps(_ok_response(body)).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _ok_response(body: dict) -> dict:
    """Text ``s<seed+k>`` per choice; one token per character, token ids ``ord(char)``."""
    choices = []
    for k in range(body.get("n", 1)):
        text = f"s{body['seed'] + k}"
        lp = {
            "tokens": [f"token_id:{ord(ch)}" for ch in text],
            "token_logprobs": [-0.25] * len(text),
            "top_logprobs": [{f"token_id:{ord(ch)}": -0.25} for ch in text],
            "text_offset": list(range(len(text))),
        }
        choices.append(
            {"index": k, "text": text, "logprobs": lp, "finish_reason": "stop", "stop_reason": None}
        )
    return {"choices": choices, "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
