"""Every error leaves the server as JSON: {"error": {"code": ..., "message": ...}} with a fitting HTTP status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from apps.store import (AccountLocked, AuthenticationError, ConflictError, InvalidTransition, NotFoundError,
                        PasswordChangeRequired, PermissionDenied)
from mmcore.errors import InputError

log = logging.getLogger("mmcore.server")


class ApiError(Exception):
    """An error with an HTTP status and a stable machine-readable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


# Store and pipeline errors -> (status, code); the first matching class wins, so subclasses come first.
ERROR_MAP = [
    (AccountLocked, 423, "account_locked"),
    (AuthenticationError, 401, "unauthenticated"),
    (PasswordChangeRequired, 403, "password_change_required"),
    (PermissionDenied, 403, "forbidden"),
    (NotFoundError, 404, "not_found"),
    (InvalidTransition, 409, "invalid_transition"),
    (ConflictError, 409, "conflict"),
    (InputError, 400, "bad_input"),
]


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def json_error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def classify(exc: BaseException) -> tuple[int, str]:
    for cls, status, code in ERROR_MAP:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return json_error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        status, code = classify(exc)
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return json_error(status, code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return json_error(422, "invalid_request", f"{where or 'request'}: {first.get('msg')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthenticated", 403: "forbidden",
                 413: "too_large", 406: "not_acceptable"}
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return json_error(exc.status_code, codes.get(exc.status_code, "http_error"), message,
                          getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return json_error(500, "internal", f"internal error ({type(exc).__name__}); the server keeps running and "
                                           "the error is in its log")
