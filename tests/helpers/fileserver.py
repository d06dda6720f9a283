"""A real HTTP file server on 127.0.0.1 for download tests.

It serves the files under ``root`` (``add_hf`` lays them out as Hugging Face does:
``/<org>/<repo>/resolve/<revision>/<path>``), answers ``Range: bytes=N-`` with 206
(unless ``ignore_range``), can cut the first GET of a path after some bytes, can
limit its speed, can leave out ``Content-Length`` (``omit_length``: the body then ends
when the connection closes), and records every request it gets.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import unquote, urlsplit

CHUNK = 16 * 1024


class Request(NamedTuple):
    method: str
    path: str
    range: str | None


class FileServer:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.requests: list[Request] = []
        self.cut_after: dict[str, int] = {}
        """URL path → bytes sent before the first GET of that path is cut."""
        self.rate: float | None = None
        """Bytes per second per response; None: as fast as possible."""
        self.ignore_range = False
        self.omit_length = False
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()

    def url(self, path: str = "") -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def add(self, path: str, content: bytes) -> str:
        """Serve ``content`` at URL ``path``; return its full URL."""
        file = self.root / path.lstrip("/")
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(content)
        return self.url(path)

    def add_hf(self, repo_id: str, name: str, content: bytes, revision: str = "main") -> str:
        return self.add(f"/{repo_id}/resolve/{revision}/{name}", content)

    def gets(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and (path is None or r.path == path)]

    def _record(self, request: Request) -> int | None:
        """Log a request; return where to cut its response, if it is to be cut."""
        with self._lock:
            self.requests.append(request)
            if request.method == "GET":
                return self.cut_after.pop(request.path, None)
            return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FileServer

    def handle_error(self, request, client_address) -> None:
        pass  # a client that goes away mid-response (a cancelled download) is expected


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        range_header = self.headers.get("Range")
        cut = owner._record(Request(self.command, path, range_header))
        file = owner.root / path.lstrip("/")
        if not file.is_file():
            self.send_error(404)
            return
        content = file.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and not owner.ignore_range:
            start = int(match[1])
            if start >= len(content):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(content)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        else:
            self.send_response(200)
        if owner.omit_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(content) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if send_body:
            self._send(content[start:], cut)

    def _send(self, body: bytes, cut: int | None) -> None:
        end = len(body) if cut is None else min(cut, len(body))
        for offset in range(0, end, CHUNK):
            piece = body[offset : min(offset + CHUNK, end)]
            self.wfile.write(piece)
            if self.server.owner.rate:
                time.sleep(len(piece) / self.server.owner.rate)
        if cut is not None:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
