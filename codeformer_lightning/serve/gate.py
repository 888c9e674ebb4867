"""ASGI middleware in front of the restoration endpoint: request size, concurrency and body syntax.

It answers, before anything reaches the inference workers:

* 503 when ``max_in_flight`` requests are already being served (counted across all HTTP
  processes through a shared counter), with ``Retry-After``;
* 413 when the body is larger than ``max_bytes`` (declared ``Content-Length`` or counted while
  reading);
* 415 for a body that is neither JSON nor ``multipart/form-data``;
* 400 for JSON that does not parse or a multipart body that does not parse.

Every answer is ``{"detail": "<message naming the problem>"}``, FastAPI's error shape. Requests
that pass are replayed to the application unchanged. Other paths are not touched.
"""

from __future__ import annotations

import json
import multiprocessing

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

JSON_TYPE = "application/json"
FORM_TYPE = "multipart/form-data"


class _Refused(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers


class RequestGate:
    """Guards ``POST path``. ``in_flight``: a shared ``multiprocessing.Value("i")`` created
    before the HTTP processes fork (one is made when not given: single-process use)."""

    def __init__(self, app: ASGIApp, *, path: str, max_bytes: int, max_in_flight: int, in_flight=None) -> None:
        self.app = app
        self.path = path
        self.max_bytes = int(max_bytes)
        self.max_in_flight = int(max_in_flight)
        self.in_flight = in_flight if in_flight is not None else multiprocessing.Value("i", 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if not self._enter():
            await _refuse(scope, receive, send, _Refused(
                503, f"server busy: {self.max_in_flight} requests already in progress (its --max-in-flight "
                     "limit); retry shortly", {"Retry-After": "1"}))
            return
        try:
            try:
                body = await self._read_checked(scope, receive)
            except _Refused as refused:
                await _refuse(scope, receive, send, refused)
                return
            await self.app(scope, _replay(body, receive), send)
        finally:
            with self.in_flight.get_lock():
                self.in_flight.value -= 1

    def _enter(self) -> bool:
        with self.in_flight.get_lock():
            if self.in_flight.value >= self.max_in_flight:
                return False
            self.in_flight.value += 1
            return True

    async def _read_checked(self, scope: Scope, receive: Receive) -> bytes:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise _Refused(413, f"request body is {int(declared)} bytes, over this server's limit of "
                                f"{self.max_bytes} bytes (--max-request-bytes)")
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in (JSON_TYPE, FORM_TYPE):
            raise _Refused(415, f"unsupported Content-Type {content_type or '(none)'!r}: send "
                                f"{JSON_TYPE} (image as base64) or {FORM_TYPE} (image as a file part)")
        body = await self._read_body(receive)
        if content_type == JSON_TYPE:
            try:
                json.loads(body)
            except ValueError as exc:
                raise _Refused(400, f"the body is not valid JSON ({exc})") from None
        else:
            try:
                form = await Request(scope, _replay(body, receive)).form()
                await form.close()
            except Exception as exc:  # starlette raises its own and python-multipart's errors
                raise _Refused(400, f"the multipart body does not parse ({exc})") from None
        return body

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Refused(400, "the client disconnected before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _Refused(413, f"request body is over this server's limit of {self.max_bytes} bytes "
                                    "(--max-request-bytes)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then defers to the real one (disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _refuse(scope: Scope, receive: Receive, send: Send, refused: _Refused) -> None:
    await JSONResponse({"detail": refused.detail}, status_code=refused.status, headers=refused.headers)(
        scope, receive, send)
