"""ASGI middleware around the whole app: request body limit, metrics, and file-URL ownership for the UI."""

from __future__ import annotations

import json
import time
from urllib.parse import unquote

from apps.server.errors import error_body
from apps.server.metrics import Metrics

FILE_PREFIXES = ("/gradio_api/file=", "/file=")


class TooLarge(Exception):
    pass


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def route_label(scope) -> str:
    """The route template ('/api/v1/reports/{report_id}') so labels stay few; the UI counts as one route."""
    route = scope.get("route")
    if route is not None and getattr(route, "path", None):
        return route.path
    path = scope.get("path", "")
    if path.startswith("/gradio_api"):
        return "/gradio_api"
    return "/ui" if not path.startswith("/api/") else "unmatched"


class ServerMiddleware:
    """Refuses bodies over `max_bytes` (declared or streamed) with 413, times every request, and guards UI files.

    Gradio serves its cache under /gradio_api/file=PATH to any logged-in user; `files.allowed(user, path)` keeps
    each file to the user it was made for (uploads are registered from the upload response, outputs when rendered).
    """

    def __init__(self, app, *, metrics: Metrics, max_bytes: int, files, session_user, ui_redirect):
        self.app, self.metrics, self.max_bytes, self.files = app, metrics, max_bytes, files
        self.session_user, self.ui_redirect = session_user, ui_redirect

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        t0 = time.perf_counter()
        status_holder = {"status": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                status_holder["status"] = 413
                return await _send_json(send, 413, self._too_large())
            location = self.ui_redirect(scope) if method == "GET" and path == "/" else None
            if location:
                status_holder["status"] = 303  # the UI needs a session (and a password of the user's own)
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", location.encode()), (b"content-length", b"0")]})
                return await send({"type": "http.response.body", "body": b""})
            if path.startswith(FILE_PREFIXES):
                user = self.session_user(scope)
                target = unquote(path.split("=", 1)[1])
                if user is None or not self.files.allowed(user, target):
                    status_holder["status"] = 404
                    return await _send_json(send, 404, error_body("not_found", "no such file for this user"))
            if path.rstrip("/").endswith("/gradio_api/upload") and method == "POST":
                return await self._upload(scope, self._limited(receive), send_wrapper)
            try:
                await self.app(scope, self._limited(receive), send_wrapper)
            except TooLarge:
                status_holder["status"] = 413
                await _send_json(send, 413, self._too_large())
        finally:
            route = route_label(scope)
            status = status_holder["status"]
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - t0)
            if status >= 400:
                self.metrics.errors.labels(route, str(status)).inc()

    def _too_large(self) -> dict:
        return error_body("too_large", f"request body: expected at most {self.max_bytes} bytes "
                                       f"({self.max_bytes / 2**20:.0f} MiB), found more")

    def _limited(self, receive):
        seen = {"n": 0}

        async def wrapped():
            message = await receive()
            if message["type"] == "http.request":
                seen["n"] += len(message.get("body", b""))
                if seen["n"] > self.max_bytes:
                    raise TooLarge()
            return message
        return wrapped

    async def _upload(self, scope, receive, send):
        """Pass a UI upload through, then register the returned cache paths to the uploading user."""
        user = self.session_user(scope)
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    body = b"".join(chunks)
                    if start.get("status") == 200 and user is not None:
                        try:
                            for p in json.loads(body):
                                self.files.register(user, p)
                        except (ValueError, TypeError):
                            pass
                    await send(start)
                    await send({"type": "http.response.body", "body": body})

        try:
            await self.app(scope, receive, capture)
        except TooLarge:
            await _send_json(send, 413, self._too_large())
