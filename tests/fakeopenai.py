"""A fake OpenAI-compatible completions server on 127.0.0.1 for engine and CLI tests.

Its "model" is a character-level one: text is tokenised one token per character (id ``ord``),
a text prompt gets a BOS token (id 1) in front, and the log-probability of token ``tok`` at
position ``i`` of the whole sequence (prompt + generated) is :func:`fake_logprob`, so generated,
echoed (scored) and streamed values can be checked against each other. Like a vLLM server it
takes token-id prompts, ``return_token_ids``, ``echo`` with ``max_tokens=0``, ``stream=true``
(server-sent events, one per token) and ``POST /tokenize``; ``vllm_like=False`` refuses them.
"""

from __future__ import annotations

import json
import select
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
    ``hang:SECONDS`` (sleep, then answer); ``drop`` (close the socket without answering);
    ``gate`` (hold the answer until ``gate`` is set, or the client goes away: counted in
    ``disconnects``). ``script`` is consumed in arrival order; ``by_prompt[prompt]`` takes
    precedence. ``stream_hold=K``: a stream holds after its first K events the same way.
    """

    def __init__(self, script=(), by_prompt=None, delay: float = 0.0, shared=None,  # type: ignore[no-untyped-def]
                 vllm_like: bool = True, stream_delay: float = 0.0,
                 processed: bool = False, stream_hold: int | None = None) -> None:  # fmt: skip
        self.vllm_like = vllm_like
        self.gate = threading.Event()
        self.disconnects = 0
        self.stream_hold = stream_hold
        self.processed = processed
        self.stream_delay = stream_delay
        self.streams: list[dict] = []  # per stream: prompt, events sent, whether it completed
        self.tokenized: list[dict] = []
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

            def do_GET(self) -> None:
                if self.path.endswith("/models"):
                    server._json(self, 200, {"data": [{"id": "m", "root": None}]})
                else:
                    server._json(self, 404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.endswith("/tokenize"):
                    server._tokenize(self, body)
                    return
                action = server._next(body)
                with server.lock:
                    server.shared["inflight"] += 1
                    server.shared["max_inflight"] = max(
                        server.shared["max_inflight"], server.shared["inflight"]
                    )
                self.counted = True
                try:
                    server._handle(self, action, body)
                finally:
                    server._answered(self)

        self.httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def _answered(self, h: BaseHTTPRequestHandler) -> None:
        """A request stops counting as in flight just before its answer goes out: the client
        cannot send its next request before then, so ``max_inflight`` never over-counts."""
        if getattr(h, "counted", False):
            h.counted = False  # type: ignore[attr-defined]
            with self.lock:
                self.shared["inflight"] -= 1

    def _next(self, body: dict) -> str:
        with self.lock:
            prompt = body.get("prompt")
            queue = self.by_prompt.get(prompt) if isinstance(prompt, str) else None
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
        if kind == "gate" and self._hold(h):
            return
        if kind in ("status", "429"):
            code = 429 if kind == "429" else int(arg)
            h.send_response(code)
            if kind == "429":
                h.send_header("Retry-After", arg)
            payload = json.dumps({"error": {"message": f"scripted {code}"}}).encode()
            h.send_header("Content-Length", str(len(payload)))
            self._answered(h)
            h.end_headers()
            h.wfile.write(payload)
            return
        if not self.vllm_like and (
            isinstance(body.get("prompt"), list) or body.get("echo") or body.get("stream")
        ):
            self._json(h, 400, {"error": {"message": "unsupported"}})
            return
        if body.get("stream"):
            self._stream(h, body)
            return
        payload = json.dumps(_ok_response(body, self.processed)).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        self._answered(h)
        h.end_headers()
        h.wfile.write(payload)

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, code: int, data: dict) -> None:
        payload = json.dumps(data).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    def _tokenize(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        with self.lock:
            self.tokenized.append(body)
        if not self.vllm_like:
            self._json(h, 404, {"detail": "Not Found"})
            return
        self._json(h, 200, {"tokens": fake_tokenize(body), "count": 0, "max_model_len": 512})

    def _stream(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        """One event per generated token, then ``[DONE]``; notes how far the client listened."""
        (choice,) = _ok_response(body, self.processed)["choices"]
        record = {"prompt": body.get("prompt"), "sent": 0, "completed": False, "ended": False,
                  "disconnected": False}  # fmt: skip
        with self.lock:
            self.streams.append(record)
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        lp = choice["logprobs"]
        n = len(choice["token_ids"])
        try:
            for t in range(n):
                event = {
                    "index": 0,
                    "text": choice["text"][t],
                    "logprobs": {
                        k: [lp[k][t]] for k in ("tokens", "token_logprobs", "top_logprobs")
                    },
                    "token_ids": [choice["token_ids"][t]],
                    "finish_reason": "stop" if t == n - 1 else None,
                    "stop_reason": None,
                }
                if t == 0:
                    event["prompt_token_ids"] = choice["prompt_token_ids"]
                h.wfile.write(f"data: {json.dumps({'choices': [event]})}\n\n".encode())
                h.wfile.flush()
                record["sent"] = t + 1
                if t + 1 == self.stream_hold and self._hold(h):
                    record["disconnected"] = True
                    return
                if self.stream_delay:
                    time.sleep(self.stream_delay)
            h.wfile.write(b"data: [DONE]\n\n")
            h.wfile.flush()
            record["completed"] = True
        except OSError:
            pass  # the client went away (an abort)
        finally:
            record["ended"] = True
        h.close_connection = True

    def _hold(self, h: BaseHTTPRequestHandler) -> bool:
        """Wait for ``gate`` (at most 30 s); True if the client closed the connection first."""
        conn = h.connection
        deadline = time.monotonic() + 30
        while not self.gate.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([conn], [], [], 0.01)
            if readable:
                try:
                    data = conn.recv(1, socket.MSG_PEEK)
                except OSError:
                    data = b""
                if not data:  # end of stream: the client went away
                    with self.lock:
                        self.disconnects += 1
                    h.close_connection = True
                    return True
        return False

    def wait_for(self, what, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        """Waits (bounded) until ``what()`` holds: a count at the server, not a timing."""
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise AssertionError("the fake server did not reach the expected state in time")
            time.sleep(0.005)

    def wait_streams_ended(self, timeout: float = 10.0) -> None:
        """Waits until every stream's handler has returned: a client can read a stream's last
        token and return before the server thread has written ``[DONE]`` (slow under load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if all(s["ended"] for s in self.streams):
                    return
            time.sleep(0.01)
        raise AssertionError("a fake stream handler did not end within the timeout")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def fake_logprob(position: int, token: int) -> float:
    """The fake model's log-probability of ``token`` at ``position`` of the whole sequence."""
    return -0.25 - 0.01 * ((position + token) % 5)


def fake_tokenize(body: dict) -> list[int]:
    """``/tokenize``: BOS (1) + one id per character; chat messages rendered as ``<role>text``."""
    if "messages" in body:
        msgs = body["messages"]
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in msgs)
        if body.get("continue_final_message"):
            text = text[:-1]
        elif body.get("add_generation_prompt", True):
            text += "<assistant>"
        return [1] + [ord(ch) for ch in text]
    ids = [ord(ch) for ch in body["prompt"]]
    return ([1] if body.get("add_special_tokens", True) else []) + ids


def _lp_block(ids: list[int], start: int, skip_first: bool = False, scale: float = 1.0) -> dict:
    values: list = [fake_logprob(start + t, tok) * scale for t, tok in enumerate(ids)]
    tokens = [f"token_id:{tok}" for tok in ids]
    tops: list = [{name: v} for name, v in zip(tokens, values, strict=True)]
    if skip_first and values:
        values[0], tops[0] = None, None  # type: ignore[call-overload]
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": list(range(len(ids))),
    }


def _ok_response(body: dict, processed: bool = False) -> dict:
    """Text ``s<seed+k>`` per choice; one token per character, token ids ``ord(char)``.
    ``processed``: generated tokens report ``fake_logprob / temperature`` (a "proposal");
    echoed prompt tokens always report the raw :func:`fake_logprob`."""
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        context = [int(t) for t in prompt]
    elif "messages" in body:
        context = fake_tokenize(body)
    else:
        context = fake_tokenize({"prompt": prompt or ""})
    if body.get("echo") and body.get("max_tokens") == 0:
        choice = {"index": 0, "text": "", "logprobs": _lp_block(context, 0, skip_first=True),
                  "finish_reason": "length", "stop_reason": None}  # fmt: skip
        if body.get("return_token_ids"):
            choice.update(token_ids=[], prompt_token_ids=context)
        return {"choices": [choice], "usage": {"prompt_tokens": len(context)}}
    choices = []
    for k in range(body.get("n", 1)):
        text = f"s{body['seed'] + k}"
        ids = [ord(ch) for ch in text]
        temp = body.get("temperature") or 1.0
        scale = 1.0 / temp if processed else 1.0
        choice = {"index": k, "text": text, "logprobs": _lp_block(ids, len(context), scale=scale),
                  "finish_reason": "stop", "stop_reason": None}  # fmt: skip
        if body.get("return_token_ids"):
            choice.update(token_ids=ids, prompt_token_ids=context)
        choices.append(choice)
    usage = {"prompt_tokens": len(context), "completion_tokens": 4}
    return {"choices": choices, "usage": usage}
