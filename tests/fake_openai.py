"""A loopback HTTP server speaking OpenAI chat completions, with knobs for tests and benchmarks.

`/v1/models` lists the model; `/v1/chat/completions` answers "echo: <last user message>" with a
`usage` block. Knobs: `latency_s`, `fail_next` (answer that many requests with `fail_status`),
`rate_limit_next` (answer that many with 429 and Retry-After), `reject_next` (400 with an
OpenAI-style error). What the answers say: `answer` (for every answer) and `answer_next(...)`
(for the next one, in order) override the echo with `content`, `finish_reason` (None too),
`message` (more message fields: reasoning, reasoning_content, tool_calls, refusal) and `body`
(more top-level fields). Every request is logged in `requests`, its body as it arrived, so
tests can assert what reached the server. Binds 127.0.0.1, or an address a test made itself
(tests/netns.py).
Run it alone with `python tests/fake_openai.py [--latency-ms N] [--port P]`: it prints its port.
"""

from __future__ import annotations

import argparse
import json
import select
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAI:
    """The server and its knobs; `base_url` is what a craftsman points at."""

    def __init__(self, model: str = "fake-model", latency_s: float = 0.0, port: int = 0,
                 host: str = "127.0.0.1") -> None:
        """`host`: loopback, or an address a test made itself (tests/netns.py)."""
        self.host = host
        self.model = model
        self.latency_s = latency_s
        self.fail_next = 0
        self.fail_status = 500
        self.rate_limit_next = 0
        self.retry_after_s = 0.1
        self.reject_next = 0
        self.answer: dict[str, Any] = {}
        self.scripted: list[dict[str, Any]] = []
        self.requests: list[dict[str, Any]] = []
        self.responses: list[dict[str, Any]] = []  # the bodies of the answers sent
        self.in_flight = 0
        self.usage: list[tuple[int, int]] = []  # (prompt, completion) of each answered request
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.request_seen = threading.Event()
        self.aborted: list[dict[str, Any]] = []  # requests whose client hung up mid-way
        self.request_aborted = threading.Event()
        ThreadingHTTPServer.request_queue_size = 256  # the default 5 drops bursts of connects
        self.server = ThreadingHTTPServer((host, port), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def completions(self) -> list[dict[str, Any]]:
        """Logged chat completion requests (bodies), in arrival order."""
        with self.lock:
            return [r["body"] for r in self.requests if r["path"].endswith("/chat/completions")]

    def answer_next(self, **answer: Any) -> None:
        """Script the next answer: content, finish_reason, message, body (see the module doc)."""
        with self.lock:
            self.scripted.append(answer)

    def _next_answer(self) -> dict[str, Any]:
        with self.lock:
            return self.scripted.pop(0) if self.scripted else self.answer

    def _next_fault(self) -> tuple[int, dict[str, Any], dict[str, str]] | None:
        with self.lock:
            if self.rate_limit_next > 0:
                self.rate_limit_next -= 1
                return 429, _error("rate limited", "rate_limit_exceeded"), {
                    "Retry-After": f"{self.retry_after_s:g}"}
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.fail_status, _error("the server had an error", "server_error"), {}
            if self.reject_next > 0:
                self.reject_next -= 1
                return 400, _error("This model's maximum context length is 512 tokens",
                                   "context_length_exceeded"), {}
        return None


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


def _words(messages: list[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content", "")).split()) for m in messages)


def _handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body in one segment, no Nagle: otherwise delayed ACKs add 40 ms a request.
        wbufsize = 1 << 16
        disable_nagle_algorithm = True

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _client_left(self, seconds: float) -> bool:
            """Wait out the latency; True if the client hung up meanwhile (request aborted)."""
            ready, _, _ = select.select([self.connection], [], [], seconds)
            if not ready:
                return False
            try:
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        def do_GET(self) -> None:
            if self.path.rstrip("/").endswith("/models"):
                self._send(200, {"object": "list", "data": [
                    {"id": fake.model, "object": "model", "owned_by": "fake"}]})
            else:
                self._send(404, _error("not found", "not_found"))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body = json.loads(raw)
            except ValueError:
                self._send(400, _error("bad JSON", "invalid_json"))
                return
            with fake.lock:
                fake.requests.append({"path": self.path, "body": body, "at": time.time(),
                                      "authorization": self.headers.get("Authorization")})
            fake.request_seen.set()
            if not self.path.endswith("/chat/completions"):
                self._send(404, _error("not found", "not_found"))
                return
            fault = fake._next_fault()
            if fault is not None:
                self._send(*fault)
                return
            with fake.lock:
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            try:
                if fake.latency_s and self._client_left(fake.latency_s):
                    with fake.lock:
                        fake.aborted.append(body)
                    fake.request_aborted.set()
                    return
            finally:
                with fake.lock:
                    fake.in_flight -= 1
            messages = body.get("messages") or []
            users = [m for m in messages if m.get("role") == "user"]
            text = "echo: " + str(users[-1].get("content", "")) if users else "echo:"
            answer = fake._next_answer()
            text = answer.get("content", text)
            prompt_tokens, completion_tokens = _words(messages), len(str(text or "").split())
            with fake.lock:
                fake.usage.append((prompt_tokens, completion_tokens))
            response = {
                "id": f"chatcmpl-{len(fake.requests)}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", fake.model),
                "choices": [{"index": 0, "finish_reason": answer.get("finish_reason", "stop"),
                             "message": {"role": "assistant", "content": text,
                                         **answer.get("message", {})}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens},
                **answer.get("body", {})}
            with fake.lock:
                fake.responses.append(response)
            self._send(200, response)

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()
    fake = FakeOpenAI(latency_s=args.latency_ms / 1000, port=args.port)
    # SIGTERM: one line of what it served, then exit (SIGKILL, as a crash, says nothing).
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=fake.server.shutdown).start())
    print(fake.port, flush=True)
    fake.server.serve_forever()
    print(json.dumps({"completions": len(fake.completions()),
                      "max_in_flight": fake.max_in_flight}), flush=True)


if __name__ == "__main__":
    main()
