"""What every request passes before a route sees it: the API key, the body size and UTF-8, the replica's bound on
HTTP requests in flight, and errors turned into OpenAI's shape (so no client input yields a 5xx).

A pure ASGI middleware (not BaseHTTPMiddleware): it checks the headers before the body is read, and counts the
body as it streams in, so a chunked upload cannot pass the size limit either.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from pipelines.common.params import ServeParams
from pipelines.serve.schemas import RETRY_AFTER_S, APIError, retry_after, short

OPEN_PATHS = ("/health",)  # answered without an API key (load balancers and Ray's health checks)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def expected_key_digest(env=os.environ) -> str | None:
    """The sha256 of the API key requests must carry, None when there is none: QUILL_API_KEY_SHA256 (what the serve
    CLI hands the replicas, so that Ray's dashboard and Serve API, which show a replica's environment, never show
    the key), else the digest of QUILL_API_KEY (set on the replica's host, as the compose stack does)."""
    if env.get("QUILL_API_KEY_SHA256"):
        return env["QUILL_API_KEY_SHA256"].lower()
    return key_digest(env["QUILL_API_KEY"]) if env.get("QUILL_API_KEY") else None


def max_in_flight(p: ServeParams) -> int:
    """The HTTP requests a replica holds at once (reading a body, waiting for the engine, streaming): as many as it
    holds sequences (serve.max_ongoing_requests; past those the engine client answers 429) and
    serve.max_queued_requests more, for what holds no sequence (an upload, /tokenize, a request being refused)."""
    return p.max_ongoing_requests + p.max_queued_requests


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class EdgeGuard:
    """ASGI middleware: 401 without the right bearer key (when one is set), 413 past max_body_bytes, 503 with
    Retry-After past max_in_flight requests (/health aside), 400 for a body that is not UTF-8. `settings`
    ({"api_key_sha256", "max_body_bytes", "max_in_flight"}: None = no bound) is read per request: the replica
    fills it in after the app is built."""

    def __init__(self, app, settings: dict):
        self.app, self.settings = app, settings
        self.in_flight = 0  # requests past this guard and not answered yet (a replica is one process)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        digest, limit = self.settings["api_key_sha256"], self.settings["max_body_bytes"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"][len(scope.get("root_path", "")) :]  # relative to the app's route prefix
        if digest and path not in OPEN_PATHS:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme != "Bearer" or not hmac.compare_digest(key_digest(given), digest):  # constant time
                err = APIError(
                    401,
                    "missing or wrong API key (Authorization: Bearer <key>)",
                    None,
                    "authentication_error",
                    "invalid_api_key",
                )
                return await error_response(err)(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            return await error_response(_too_large(limit))(scope, receive, send)
        if path in OPEN_PATHS:
            return await self.body_checked(scope, receive, send)
        bound = self.settings.get("max_in_flight")
        if bound is not None and self.in_flight >= bound:
            return await error_response(_overloaded(bound))(scope, receive, send)
        self.in_flight += 1
        try:
            return await self.body_checked(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def body_checked(self, scope, receive, send):
        """The body (read here, at most max_body_bytes) must be UTF-8; then the app gets it."""
        limit = self.settings["max_body_bytes"]
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # read the whole body here (bounded), check it, then replay it to the app
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await error_response(_too_large(limit))(scope, receive, send)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            err = APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", None)
            return await error_response(err)(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: disconnect notifications pass through
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", None, code="request_too_large")


def _overloaded(bound: int) -> APIError:
    message = f"this replica holds {bound} HTTP requests, as many as it takes; retry in {RETRY_AFTER_S} s"
    return APIError(503, message, None, "server_error", "server_overloaded", headers=retry_after())


def install_error_handlers(api: FastAPI) -> None:
    """Validation, HTTP and unexpected errors, all in OpenAI's shape."""

    @api.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"request body is not valid JSON: {first.get('msg', '')}", None))
        param = loc[0] if loc else None
        where = short(".".join(loc), quoted=False) or "body"  # a dict key in the path is the client's text
        msg = f"{where}: {first.get('msg', 'invalid value')}"
        if "input" in first and first.get("type") != "missing":
            msg += f" (got {short(first['input'])})"
        return error_response(APIError(400, msg, param))

    @api.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), None, kind))

    @api.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug of ours: still answered in OpenAI's shape
        return error_response(APIError(500, f"internal error: {type(exc).__name__}", None, "server_error"))
