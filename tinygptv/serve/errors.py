"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

from __future__ import annotations


class ApiError(Exception):
    """An error answered to the client; ``status`` < 500 means the request itself was at fault."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def queue_full(size: int) -> ApiError:
    return ApiError(429, f"the server queue is full ({size} requests waiting); retry later", "rate_limit_error",
                    None, "queue_full")


def timed_out(seconds: float) -> ApiError:
    return ApiError(504, f"the request did not complete within the server timeout of {seconds:g} s", "timeout_error",
                    None, "timeout")


def server_error(message: str) -> ApiError:
    return ApiError(500, message, "server_error", None, "internal_error")
