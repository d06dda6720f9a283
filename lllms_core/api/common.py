"""What every route shares: the app's state, JSON bodies in and out, errors, SSE."""

from __future__ import annotations

import copy
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import msgspec
from quart import Response, current_app, request

from lllms_core.errors import InvalidRequestError, LllmsError, QueueFullError
from lllms_core.server import ModelServer, parse_request
from lllms_core.store import model_files

T = TypeVar("T")


class MethodNotAllowedError(InvalidRequestError):
    status = 405
    code = "method_not_allowed"


class InternalError(LllmsError):
    """A fault of lllms itself: the message gives the request id, the log the details."""

    code = "internal_error"


class PathRedactor:
    """Cuts the directories of the model files and of the cache from the strings of a JSON
    body, so that clients see file names, not where the server keeps them."""

    def __init__(self, directories: list[Path]):
        ordered = sorted({str(directory) for directory in directories if str(directory) != "/"}, key=len, reverse=True)
        # a directory and its separator go; a directory named on its own becomes its name
        alternatives = [f"{re.escape(d)}(?:{re.escape(os.sep)}|(?![\\w.-]))" for d in ordered]
        self._pattern = re.compile("|".join(alternatives)) if alternatives else None

    def __call__(self, value: Any) -> Any:
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self._pattern.sub(self._name, value)
        if isinstance(value, dict):
            return {key: self(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self(item) for item in value]
        return value

    @staticmethod
    def _name(match: re.Match) -> str:
        text = match.group(0)
        return "" if text.endswith(os.sep) else os.path.basename(text)

    @classmethod
    def of(cls, server: ModelServer) -> "PathRedactor":
        directories = [server.store.cache_dir]
        for model in server.config.models.values():
            try:
                directories += [file.path.parent for file in model_files(model, server.store.cache_dir)]
            except LllmsError:  # a bad source: its error names no path
                continue
        return cls(directories)


class AppState:
    """What the routes of one app share: the model server and the metrics."""

    def __init__(self, server: ModelServer, metrics: Any):
        self.server = server
        self.metrics = metrics
        shown_as_is = server.config.http.expose_paths
        self.public: Callable[[Any], Any] = (lambda value: value) if shown_as_is else PathRedactor.of(server)
        """What a status, health or error body may show: without file paths unless
        ``http.expose_paths``."""
        self.created = int(time.time())
        """Reported as each model's ``created``: the models exist since the server started."""
        plugin_parameters = {
            parameter
            for sampler in server.plugins.samplers.values()
            if sampler.logits_processor is not None
            for parameter in sampler.parameters
        }
        self.plugin_parameters = plugin_parameters
        """Parameters of plugin samplers: not request fields, so taken from the raw body."""

    def public_error(self, error: LllmsError) -> LllmsError:
        """``error`` as clients may see it: its message without file paths."""
        message = self.public(error.message)
        if message == error.message:
            return error
        shown = copy.copy(error)
        shown.message, shown.args = message, (message,)
        return shown


def state() -> AppState:
    return current_app.extensions["lllms"]


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return current_app.response_class(
        msgspec.json.encode(body), status=status, headers=headers, mimetype="application/json"
    )


ERROR_SHAPES: list[tuple[str, Callable[[LllmsError], Any]]] = []
"""(path prefix, the body of an error): the routes of APIs whose errors are not OpenAI's shape."""


def error_shape(*prefixes: str):
    """Register a function that writes an error's body for the routes under ``prefixes``."""

    def register(shape: Callable[[LllmsError], Any]) -> Callable[[LllmsError], Any]:
        ERROR_SHAPES.extend((prefix, shape) for prefix in prefixes)
        return shape

    return register


def error_body(error: LllmsError, path: str) -> Any:
    """An error's body in the shape of the API ``path`` belongs to (OpenAI's unless registered)."""
    for prefix, shape in ERROR_SHAPES:
        if path == prefix or path.startswith(prefix + "/"):
            return shape(error)
    return error.to_dict()


def error_response(error: LllmsError) -> Response:
    """An error in the shape of the request's API (OpenAI's by default), with its status (and
    ``Retry-After`` when the queue is full)."""
    headers = {}
    if isinstance(error, QueueFullError):
        headers["Retry-After"] = str(error.retry_after)
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return json_response(error_body(state().public_error(error), request.path), error.status, headers)


async def read_request(kind: type[T]) -> T:
    """The request Struct of this request's JSON body, with plugin sampler parameters
    moved into ``plugin_parameters``."""
    body = await request.get_data(as_text=False)
    parsed = parse_request(body, kind)
    wanted = state().plugin_parameters - set(getattr(kind, "__struct_fields__", ()))
    if wanted and "plugin_parameters" in kind.__struct_fields__ and any(f'"{name}"'.encode() in body for name in wanted):
        raw = parse_request(body, dict[str, Any])
        values = {name: raw[name] for name in wanted if raw.get(name) is not None}
        if values:
            parsed = msgspec.structs.replace(parsed, plugin_parameters=values)
    return parsed


def sse(body: Any) -> bytes:
    """One server-sent event carrying a JSON body."""
    return b"data: " + msgspec.json.encode(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"
