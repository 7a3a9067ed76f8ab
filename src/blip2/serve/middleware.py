"""ASGI middleware of the server: the body-size limit, and operations (request ids, API-key auth, metrics,
one log line per request). Both are plain ASGI, so that streaming responses and disconnect detection pass
through untouched."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

__all__ = ["BodyLimit", "Operations", "dumps", "error_body"]

log = logging.getLogger("blip2.serve")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def dumps(obj) -> str:
    # ASCII escapes keep lone surrogates from the request (echoed in validation messages) encodable
    return json.dumps(obj, ensure_ascii=True)


def error_body(message: str, status: int, code: str | None = None) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message[:1000], "type": kind, "code": code}}


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuses bodies over `limit` bytes with 413 before anything parses them (Content-Length or counted while
    reading), then replays the body to the app."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send, length.isdigit())
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send, True)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # e.g. http.disconnect, which streaming responses listen for

        await self.app(scope, replay, send)

    async def _refuse(self, send, too_large: bool):
        status = 413 if too_large else 400
        msg = f"the request body is larger than {self.limit} bytes" if too_large else "invalid Content-Length"
        await _send_json(send, status, error_body(msg, status, "body_too_large" if too_large else None),
                         [(b"connection", b"close")])


class Operations:
    """Outermost middleware. Every response carries `X-Request-ID` (the client's, when it sent a sane one; else a
    new one), which the per-request log line and error logs name. With `api_key`, every path but the open ones
    (the page and /health) needs `Authorization: Bearer KEY`, compared in constant time; otherwise 401.
    Requests are counted by endpoint (the known paths; anything else is "other") and status, and timed."""

    def __init__(self, app, metrics=None, api_key: str | None = None, endpoints: tuple = (),
                 open_paths: tuple = ("/", "/health")):
        self.app, self.metrics, self.endpoints, self.open_paths = app, metrics, set(endpoints), set(open_paths)
        self.key = f"Bearer {api_key}".encode() if api_key is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = rid if _REQUEST_ID.match(rid) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        endpoint = path if path in self.endpoints else "other"
        t0, status = time.perf_counter(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if self.key is not None and path not in self.open_paths and not self._authorized(headers):
                await _send_json(send_with_id, 401, error_body("missing or wrong API key: send "
                                                               "Authorization: Bearer KEY", 401, "invalid_api_key"),
                                 [(b"www-authenticate", b"Bearer")])
                return
            await self.app(scope, receive, send_with_id)
        finally:
            dt = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.requests.labels(endpoint, str(status[0] or 499)).inc()
                self.metrics.latency.labels(endpoint).observe(dt)
            log.info("request %s %s %s -> %s in %.1f ms", rid, scope.get("method"), path, status[0] or "gone",
                     dt * 1000)

    def _authorized(self, headers: dict) -> bool:
        return hmac.compare_digest(headers.get(b"authorization", b""), self.key)
