"""The JSON-over-HTTP plumbing of the REST stubs (:mod:`fakes.compute`, :mod:`fakes.batch`).

A stub subclasses :class:`JsonApi` with its ``routes`` (method, path regex, handler name) and
its error shape (:meth:`JsonApi.error_body`), and implements ``h_<name>(params, query, body)
-> (status, json)``; :func:`serve` starts it on a free local port. Every request is recorded
in ``stub.requests``; while ``stub.failures`` is above 0 the API is in an outage and answers
503 (counting down).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

Routes = list[tuple[str, re.Pattern[str], str]]


class StubError(Exception):
    """An HTTP error of a stub: ``status`` and the body in the API's JSON error shape."""

    status: int = 500

    def body(self) -> dict[str, Any]:
        raise NotImplementedError


def reply(
    h: BaseHTTPRequestHandler,
    status: int,
    data: bytes,
    ctype: str,
    headers: dict[str, str] | None = None,
) -> None:
    """One HTTP response; a client that went away (a killed guest) is not an error."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


class JsonApi(BaseHTTPRequestHandler):
    """Routes a request to ``h_<handler>``; see the module docstring."""

    stub: Any
    routes: Routes = []
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    # --- what a stub says its own way -----------------------------------------------------

    def error_body(self, status: int, message: str) -> dict[str, Any]:
        """The API's JSON error for ``status`` (an outage, an unknown method)."""
        raise NotImplementedError

    def read_body(self, raw: bytes) -> dict[str, Any]:
        """A request body as the API reads it (a StubError for a malformed one)."""
        return json.loads(raw) if raw else {}

    # --- the plumbing -------------------------------------------------------------------------

    def send_json(self, status: int, body: dict[str, Any]) -> None:
        reply(self, status, json.dumps(body).encode(), "application/json; charset=UTF-8")

    def dispatch(self, method: str) -> None:
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        path = unquote(url.path)
        self.stub.requests.append((method, path))
        if self.stub.failures > 0:  # an outage: the API answers 503 for a while
            self.stub.failures -= 1
            self.send_json(503, self.error_body(503, "The service is currently unavailable."))
            return
        for m, pattern, handler in self.routes:
            match = pattern.match(path)
            if m == method and match:
                try:
                    body = self.read_body(raw)
                    status, out = getattr(self, "h_" + handler)(match.groupdict(), query, body)
                except StubError as e:
                    status, out = e.status, e.body()
                self.send_json(status, out)
                return
        self.send_json(404, self.error_body(404, f"no such method: {method} {path}"))

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")


def serve(handler: type[JsonApi], stub: Any) -> tuple[ThreadingHTTPServer, str]:
    """``handler`` bound to ``stub``, serving on 127.0.0.1 in a daemon thread; its base URL."""
    bound = type("Handler", (handler,), {"stub": stub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), bound)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class Served:
    """A stub's life: :meth:`start` serves its ``handler`` on a free local port (``url``),
    :meth:`stop` shuts it down; also a context manager."""

    handler: type[JsonApi]
    url: str = ""
    _server: ThreadingHTTPServer | None = None

    def start(self) -> str:
        self._server, self.url = serve(self.handler, self)
        return self.url

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
