"""The HTTP app: OpenAI's API plus the status, health, metrics and OpenAPI routes.

``create_app(config_or_server)`` builds a quart-trio app around a
:class:`~lllms_core.server.ModelServer`, which lives as long as the app serves
(it is entered in a task of the app's nursery, without waiting for models to
load: ``/health`` says 503 until they are). ``app`` is the app configured from
the file named by ``$LLLMS_CONFIG`` (or the built-in default configuration),
for ``hypercorn -k trio lllms_core.app:app``.

Every request runs inside a nursery of its own (see :class:`RequestConnection`):
a streamed completion is produced by a task of it, so when the client goes away
(quart-trio cancels the request) the generation is cancelled with it.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import sys
import time
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.asgi import TrioASGIHTTPConnection
from werkzeug.exceptions import HTTPException

from lllms_core.api.common import (
    AppState,
    InternalError,
    MethodNotAllowedError,
    error_response,
    json_response,
    state,
)
from lllms_core.api import anthropic, ollama, responses, utility
from lllms_core.api.images import images_api
from lllms_core.api.audio import audio_api
from lllms_core.api.openai import PREFIXES, api
from lllms_core.api.openapi import openapi_document
from lllms_core.config import Config
from lllms_core.errors import (
    AuthenticationError,
    InvalidRequestError,
    LllmsError,
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from lllms_core.metrics import Metrics
from lllms_core.server import ModelServer

log = logging.getLogger("lllms.http")

TRIO_REQUIRED = "needs hypercorn's trio worker: start it with `hypercorn -k trio lllms_core.app:app`"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
OPEN_PATHS = frozenset({"/health"})
"""Paths served without an API key."""


def in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


class RequestConnection(TrioASGIHTTPConnection):
    """quart-trio's HTTP connection, plus: a request id (accepted from the client's
    ``x-request-id`` when sane), a nursery for the request's tasks, ``Connection: close``
    on a response sent before the request's body was read, and the log line and metrics
    of each request once its response has ended."""

    async def __call__(self, receive, send) -> None:
        app_state: AppState = self.app.extensions["lllms"]
        request_id = self._request_id()
        self.scope["lllms.request_id"] = request_id
        status = None
        completed = False
        body_unread = self._has_body()

        async def receive_noting_the_body_end() -> dict:
            nonlocal body_unread
            message = await receive()
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                body_unread = False
            return message

        async def send_with_id(message: dict) -> None:
            nonlocal status, completed
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message["headers"], (b"x-request-id", request_id.encode())]
                if body_unread:
                    # an answer before the body was read (401, 404, 413...): the rest of the body
                    # would stall the connection, and the next request on it would never be answered
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        started = time.perf_counter()
        try:
            async with trio.open_nursery() as nursery:
                self.scope["lllms.nursery"] = nursery
                await super().__call__(receive_noting_the_body_end, send_with_id)
                nursery.cancel_scope.cancel()
        finally:
            seconds = time.perf_counter() - started
            status = status or 499  # the client went away before a response started (nginx's convention)
            app_state.metrics.request_finished(self.scope.get("lllms.route", "unmatched"), status, seconds)
            method, path = self.scope["method"], self.scope["path"]
            log.info(
                "%s %s %s %.3fs%s",
                method,
                path,
                status,
                seconds,
                "" if completed else " (client disconnected)",
                extra={
                    "request_id": request_id,
                    "method": method,
                    "path": path,
                    "status": status,
                    "seconds": round(seconds, 6),
                    "completed": completed,
                },
            )

    def _has_body(self) -> bool:
        for name, value in self.scope["headers"]:
            name = name.lower()
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
                return True
        return False

    def _request_id(self) -> str:
        for name, value in self.scope["headers"]:
            if name.lower() == b"x-request-id":
                candidate = value.decode("latin1")
                if REQUEST_ID.fullmatch(candidate):
                    return candidate
        return "req_" + secrets.token_hex(12)


class LllmsApp(QuartTrio):
    asgi_http_class = RequestConnection

    async def __call__(self, scope, receive, send) -> None:
        if not in_trio():  # hypercorn's asyncio worker: say what to do, in one line
            exit_at_startup(TRIO_REQUIRED)
        await super().__call__(scope, receive, send)


def exit_at_startup(message: str) -> None:
    """Print ``message`` and end the process. Only for failures at start-up, when nothing
    needs cleaning up: an exception would reach hypercorn as a multi-page traceback."""
    sys.stderr.write(f"lllms: {message}\n")
    sys.stderr.flush()
    os._exit(2)


def api_keys(config: Config) -> list[bytes]:
    keys = list(config.http.api_keys)
    if os.environ.get("LLLMS_API_KEY"):
        keys.append(os.environ["LLLMS_API_KEY"])
    return [key.encode() for key in keys if key]


def create_app(config_or_server: ModelServer | Config | dict | str | os.PathLike | None = None) -> LllmsApp:
    """The HTTP app for a :class:`ModelServer`, or for a configuration (a Config,
    dict or TOML path) it builds one from. The app enters the server when it starts
    serving and exits it (disposing every instance) when it stops, unless the server
    was already entered by the caller, who then owns its lifetime."""
    if isinstance(config_or_server, ModelServer):
        server = config_or_server
    else:
        server = ModelServer(config_or_server, wait_ready=False)
    http = server.config.http
    keys = api_keys(server.config)
    origins = set(http.cors_origins)

    app = LllmsApp("lllms")
    app.config.update(
        MAX_CONTENT_LENGTH=http.max_body_size,
        RESPONSE_TIMEOUT=None,  # completions stream for as long as they take
    )
    app.extensions["lllms"] = AppState(server, Metrics(server))
    for prefix in PREFIXES:
        app.register_blueprint(api, url_prefix=prefix, name="openai" + prefix.replace("/", "_"))
        app.register_blueprint(images_api, url_prefix=prefix, name="images" + prefix.replace("/", "_"))
        app.register_blueprint(audio_api, url_prefix=prefix, name="audio" + prefix.replace("/", "_"))
    for blueprint in (anthropic.api, responses.api, ollama.api, utility.api):
        app.register_blueprint(blueprint)

    @app.before_serving
    async def start_model_server() -> None:
        await app.nursery.start(run_model_server, server)

    @app.before_request
    async def authenticate_and_preflight() -> Response | None:
        request.scope["lllms.route"] = request.url_rule.rule if request.url_rule else "unmatched"
        if request.method == "OPTIONS":
            if origins and request.headers.get("Access-Control-Request-Method"):
                return preflight_response(origins)
            return None
        if keys and request.path not in OPEN_PATHS:
            check_api_key(keys)
        return None

    if origins:

        @app.after_request
        async def allow_origin(response: Response) -> Response:
            add_cors_headers(response, origins)
            return response

    @app.errorhandler(LllmsError)
    async def lllms_error(error: LllmsError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        response = error_response(translate_http_error(error))
        if error.code == 405 and getattr(error, "valid_methods", None):
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        request_id = request.scope.get("lllms.request_id")
        log.error(
            "internal error in %s %s", request.method, request.path, exc_info=error, extra={"request_id": request_id}
        )
        return error_response(InternalError(f"Internal server error (request id {request_id})"))

    @app.get("/")
    async def status() -> Response:
        if server.pool is None:
            raise ServiceUnavailableError("the server is starting")
        return json_response(state().public(await server.report()))

    @app.get("/health")
    async def health() -> Response:
        if server.pool is None:
            return json_response({"status": "starting"}, 503)
        failures = server.pool.failures()
        if failures:
            return json_response(state().public({"status": "failed", "errors": failures}), 503)
        if server.ready:
            return json_response({"status": "ok"})
        return json_response({"status": "loading"}, 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state().metrics.render()
        return app.response_class(body, content_type=content_type)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return json_response(openapi_document())

    return app


async def run_model_server(server: ModelServer, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Keep ``server`` entered until the app's nursery is cancelled at shutdown."""
    if server.pool is not None:
        task_status.started()
        return
    async with server:
        task_status.started()
        await trio.sleep_forever()


def check_api_key(keys: list[bytes]) -> None:
    """A key as ``Authorization: Bearer <key>``, or as ``x-api-key`` (Anthropic's clients)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        token = request.headers.get("x-api-key", "")
        if not token:
            raise AuthenticationError("Missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`")
    given = token.strip().encode()
    # compare with every key, so the time taken does not tell which one nearly matched
    matched = [hmac.compare_digest(given, key) for key in keys]
    if not any(matched):
        raise AuthenticationError("Incorrect API key")


def origin_allowed(origin: str | None, origins: set[str]) -> bool:
    return origin is not None and ("*" in origins or origin in origins)


def add_cors_headers(response: Response, origins: set[str]) -> None:
    origin = request.headers.get("Origin")
    if not origin_allowed(origin, origins):
        return
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
    response.headers["Access-Control-Expose-Headers"] = "x-request-id, retry-after"
    if "*" not in origins:
        response.vary.add("Origin")


def preflight_response(origins: set[str]) -> Response:
    response = Response("", status=204)
    origin = request.headers.get("Origin")
    if origin_allowed(origin, origins):
        requested = request.headers.get("Access-Control-Request-Headers")
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = (
            requested or "Authorization, Content-Type, X-Request-Id, X-Api-Key, Anthropic-Version"
        )
        response.headers["Access-Control-Max-Age"] = "600"
    return response


def translate_http_error(error: HTTPException) -> LllmsError:
    """Quart's routing and body errors in OpenAI's error shape."""
    if error.code == 404:
        return NotFoundError(f"Unknown route: {request.method} {request.path}")
    if error.code == 405:
        return MethodNotAllowedError(f"Method {request.method} is not allowed for {request.path}")
    if error.code == 413:
        limit = request.max_content_length
        return PayloadTooLargeError(f"The request body is larger than the limit of {limit} bytes")
    if error.code is not None and 400 <= error.code < 500:
        translated = InvalidRequestError(error.description or error.name)
        translated.status = error.code
        return translated
    return InternalError(error.description or "Internal server error")


class EnvironmentApp:
    """The app configured from ``$LLLMS_CONFIG`` (or the built-in default configuration),
    built when the ASGI server first calls it, so that importing this module is cheap."""

    def __init__(self) -> None:
        self._app: LllmsApp | None = None

    def load(self) -> LllmsApp:
        if self._app is None:
            self._app = create_app(environment_config())
        return self._app

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None and scope["type"] == "lifespan":
            try:
                self.load()
            except LllmsError as error:
                exit_at_startup(error.message)
        await self.load()(scope, receive, send)


def environment_config() -> Any:
    path = os.environ.get("LLLMS_CONFIG")
    if path:
        return path
    try:
        from lllms_core.defaults import default_config
    except ImportError:
        return None
    return default_config()


app = EnvironmentApp()
