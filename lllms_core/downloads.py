"""Downloading and verifying model files.

- :func:`fetch` streams a URL into ``<dest>.part`` with httpx, resumes with a
  ``Range`` request after an interruption and retries a cut connection.
- :func:`verify_file` checks a file's sha256/md5, remembering digests by
  (size, mtime) in a :class:`VerificationCache` so a large file is hashed once.
- :func:`file_lock` holds ``<dest>.lock`` so processes sharing a cache download a file once.
- :class:`Transfer` counts a running download; :class:`DownloadProgress` is its snapshot.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import filelock
import httpx
import msgspec
import trio

from lllms_core.errors import ChecksumMismatchError, DownloadError

log = logging.getLogger("lllms.store")

WRITE_SIZE = 1 << 20
"""Bytes received before they are written (and hashed) in a worker thread."""
RETRIES = 4
"""Attempts in a row that receive nothing before a download fails."""
BACKOFF = 0.5
"""Seconds before a retry; doubles with each attempt that received nothing."""
SPEED_WINDOW = 5.0
"""Seconds over which the speed is measured."""
LOCK_POLL = 0.2
TIMEOUT = httpx.Timeout(60.0, connect=30.0)
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class DownloadProgress(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a running download."""

    url: str
    file: str
    """Where the file goes (its final path; the bytes land in ``<file>.part`` first)."""
    model: str | None
    """The id of the model the download is for, if any."""
    downloaded: int
    total: int | None
    """None until the server tells the size."""
    percent: float | None
    speed: float
    """Bytes per second over the last few seconds."""
    eta: float | None
    """Seconds left at the current speed, if known."""


class Transfer:
    """The live counters of one download. Updating and polling are cheap."""

    def __init__(self, url: str, file: Path, model: str | None):
        self.url = url
        self.file = file
        self.model = model
        self.downloaded = 0
        self.total: int | None = None
        self._samples: deque[tuple[float, int]] = deque()

    def start(self, offset: int, total: int | None) -> None:
        """A response starts at byte ``offset`` of ``total``."""
        self.downloaded = offset
        self.total = total
        self._samples.clear()
        self._samples.append((time.monotonic(), offset))

    def advance(self, size: int) -> None:
        self.downloaded += size
        now = time.monotonic()
        if len(self._samples) > 1 and now - self._samples[-1][0] < 0.1:
            self._samples[-1] = (now, self.downloaded)
        else:
            self._samples.append((now, self.downloaded))
        # keep one sample older than the window, so the window is always covered
        while len(self._samples) > 2 and now - self._samples[1][0] > SPEED_WINDOW:
            self._samples.popleft()

    def progress(self) -> DownloadProgress:
        speed = 0.0
        if self._samples:
            since, downloaded_then = self._samples[0]
            elapsed = time.monotonic() - since
            if elapsed > 0:
                speed = (self.downloaded - downloaded_then) / elapsed
        percent = eta = None
        if self.total:
            percent = min(100.0, 100.0 * self.downloaded / self.total)
            if speed > 0:
                eta = max(0, self.total - self.downloaded) / speed
        return DownloadProgress(
            url=self.url,
            file=str(self.file),
            model=self.model,
            downloaded=self.downloaded,
            total=self.total,
            percent=percent,
            speed=speed,
            eta=eta,
        )


def hash_file(path: Path, algorithms: Iterable[str]) -> dict[str, "hashlib._Hash"]:
    """Hash a whole file (blocking: call it in a worker thread)."""
    hashers = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    with open(path, "rb") as file:
        while block := file.read(WRITE_SIZE):
            for hasher in hashers.values():
                hasher.update(block)
    return hashers


def check_digests(what: str, expected: Mapping[str, str], actual: Mapping[str, str]) -> None:
    for algorithm, digest in expected.items():
        if actual[algorithm].lower() != digest.lower():
            raise ChecksumMismatchError(
                f"{algorithm} checksum mismatch for {what}: expected {digest.lower()}, got {actual[algorithm]}"
            )


class _Verified(msgspec.Struct):
    path: str
    size: int
    mtime_ns: int
    digests: dict[str, str]


_decode_verified = msgspec.json.Decoder(_Verified).decode


class VerificationCache:
    """Digests of files by (size, mtime_ns), one small JSON per file in ``directory``.

    A file whose size or modification time changed is hashed again. The records
    live in the cache directory, not beside the files, because a model file may lie
    where lllms must not write (an installed package, a read-only volume).
    """

    def __init__(self, directory: Path):
        self.directory = directory

    def _record(self, path: Path) -> Path:
        return self.directory / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"

    def digests(self, path: Path, stat: os.stat_result) -> dict[str, str]:
        """The digests known for the file at ``path`` as it is now (per ``stat``)."""
        path = path.resolve()
        try:
            record = _decode_verified(self._record(path).read_bytes())
        except (OSError, msgspec.DecodeError):
            return {}
        if (record.path, record.size, record.mtime_ns) != (str(path), stat.st_size, stat.st_mtime_ns):
            return {}
        return record.digests

    def remember(self, path: Path, stat: os.stat_result, digests: Mapping[str, str]) -> None:
        path = path.resolve()
        record = _Verified(str(path), stat.st_size, stat.st_mtime_ns, {**self.digests(path, stat), **digests})
        target = self._record(path)
        temporary = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temporary.write_bytes(msgspec.json.encode(record))
            os.replace(temporary, target)
        except OSError as error:  # a read-only cache: verify again next time
            log.debug("cannot remember the digests of %s: %s", path, error)


async def verify_file(path: Path, expected: Mapping[str, str], cache: VerificationCache) -> None:
    """Raise :class:`ChecksumMismatchError` unless ``path`` has the ``expected`` digests
    (by algorithm name); hash only what ``cache`` does not know for the file as it is."""
    stat = path.stat()
    known = cache.digests(path, stat)
    missing = [algorithm for algorithm in expected if algorithm not in known]
    if missing:
        log.debug("hashing %s (%s)", path, ", ".join(missing))
        hashers = await trio.to_thread.run_sync(hash_file, path, missing, abandon_on_cancel=True)
        computed = {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}
        cache.remember(path, stat, computed)
        known = {**known, **computed}
    check_digests(str(path), expected, known)


@asynccontextmanager
async def file_lock(path: Path) -> AsyncIterator[None]:
    """Hold the inter-process lock ``path``, polling so that trio is never blocked."""
    lock = filelock.FileLock(path)
    waiting = False
    while True:
        try:
            lock.acquire(timeout=0)
            break
        except filelock.Timeout:
            if not waiting:
                log.info("waiting for another process holding %s", path)
                waiting = True
            await trio.sleep(LOCK_POLL)
    try:
        yield
    finally:
        lock.release()


class _Interrupted(Exception):
    """A download attempt ended early; the next one resumes."""


class _PartFile:
    """The ``.part`` file of a download and the running hashes of its content."""

    def __init__(self, path: Path, algorithms: Iterable[str]):
        self.path = path
        self.algorithms = tuple(algorithms)
        self._hashers: dict[str, "hashlib._Hash"] = {}
        self._file = None
        self._buffer = bytearray()
        self._written = 0

    async def open(self) -> None:
        if self.path.exists():
            self._hashers = await trio.to_thread.run_sync(hash_file, self.path, self.algorithms, abandon_on_cancel=True)
            self._written = self.path.stat().st_size
            log.debug("resuming %s at %d bytes", self.path, self._written)
        else:
            self._hashers = {algorithm: hashlib.new(algorithm) for algorithm in self.algorithms}
        self._file = open(self.path, "ab")

    @property
    def size(self) -> int:
        return self._written + len(self._buffer)

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        for hasher in self._hashers.values():
            hasher.update(data)
        self._written += len(data)

    async def write(self, chunk: bytes) -> None:
        self._buffer += chunk
        if len(self._buffer) >= WRITE_SIZE:
            data = bytes(self._buffer)
            await trio.to_thread.run_sync(self._write, data)
            # cleared only once written: a cancelled write leaves the bytes for close()
            self._buffer.clear()

    def restart(self) -> None:
        """Drop the content: the server sends the file from its start."""
        self._buffer.clear()
        self._file.truncate(0)
        self._written = 0
        self._hashers = {algorithm: hashlib.new(algorithm) for algorithm in self.algorithms}

    def _complete(self) -> dict[str, str]:
        self._write(bytes(self._buffer))
        self._buffer.clear()
        self._file.flush()
        os.fsync(self._file.fileno())
        return {algorithm: hasher.hexdigest() for algorithm, hasher in self._hashers.items()}

    async def complete(self) -> dict[str, str]:
        """Write what is buffered, to disk; return the digests of the whole file."""
        return await trio.to_thread.run_sync(self._complete)

    def close(self) -> None:
        """Keep what was received, for a later resume."""
        if self._file is None or self._file.closed:
            return
        if self._buffer:
            self._write(bytes(self._buffer))
            self._buffer.clear()
        self._file.close()


def _content_range(header: str | None) -> tuple[int, int | None]:
    """``bytes 100-199/200`` → (100, 200); the total may be ``*``."""
    try:
        span, _, total = (header or "").partition(" ")[2].partition("/")
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except ValueError:
        raise _Interrupted(f"invalid Content-Range {header!r}") from None


def _end_is_explicit(response: httpx.Response, total: int | None) -> bool:
    """Whether a cut connection can be told from the end of the body: the size is known, or
    the body is chunked (its last chunk marks its end). A body without either ends when the
    server closes the connection, whether the file is complete or not."""
    return total is not None or "chunked" in response.headers.get("transfer-encoding", "").lower()


async def _receive(client: httpx.AsyncClient, url: str, part: _PartFile, transfer: Transfer, checked: bool) -> None:
    """One attempt: request what ``part`` lacks and append it."""
    offset = part.size
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    async with client.stream("GET", url, headers=headers) as response:
        if response.status_code == 206:
            start, total = _content_range(response.headers.get("content-range"))
            if start != offset:
                part.restart()
                raise _Interrupted(f"the server sent bytes from {start} instead of {offset}")
        elif response.status_code == 200:
            if offset:
                log.debug("%s does not resume downloads; starting again", url)
                part.restart()
            length = response.headers.get("content-length")
            total = int(length) if length and length.isdigit() else None
        elif response.status_code == 416:  # the .part is not a prefix of this file
            part.restart()
            raise _Interrupted("the server cannot resume from the partial file")
        elif response.status_code in RETRY_STATUSES:
            raise _Interrupted(f"HTTP {response.status_code} {response.reason_phrase}")
        else:
            raise DownloadError(f"downloading {url} failed: HTTP {response.status_code} {response.reason_phrase}")
        if not checked and not _end_is_explicit(response, total):
            raise DownloadError(
                f"cannot download {url} safely: the server does not send its size (no Content-Length), so a "
                "connection cut early would look like the end of the file; configure its sha256 to download it"
            )
        transfer.start(part.size, total)
        async for chunk in response.aiter_raw():
            await part.write(chunk)
            transfer.advance(len(chunk))
    if total is not None and part.size != total:
        raise _Interrupted(f"the connection closed after {part.size} of {total} bytes")


async def fetch(
    url: str,
    path: Path,
    transfer: Transfer,
    *,
    algorithms: Iterable[str],
    checked: bool,
    headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Download ``url`` into ``path`` (a ``.part`` file), resuming from what it holds,
    and return its digests for ``algorithms``. A cut connection is retried (resuming);
    after :data:`RETRIES` attempts in a row that receive nothing, :class:`DownloadError`.
    On cancellation or failure the received bytes stay in ``path``. ``checked``: the caller
    checks the digests against a checksum; without one, a server that does not tell where
    the file ends (no size, not chunked) is refused, since a cut would pass for the end."""
    part = _PartFile(path, algorithms)
    failures = 0
    async with httpx.AsyncClient(follow_redirects=True, timeout=TIMEOUT, headers=headers) as client:
        try:
            await part.open()
            while True:
                before = part.size
                try:
                    await _receive(client, url, part, transfer, checked)
                    return await part.complete()
                except (_Interrupted, httpx.TransportError) as error:
                    reason = str(error) or type(error).__name__
                    failures = 0 if part.size > before else failures + 1
                    if failures > RETRIES:
                        raise DownloadError(f"downloading {url} failed after {RETRIES} retries: {reason}") from error
                    delay = BACKOFF * 2 ** max(failures - 1, 0)
                    log.info("download of %s interrupted at %d bytes (%s); retrying in %.1f s", url, part.size, reason, delay)
                    await trio.sleep(delay)
        except httpx.HTTPError as error:
            raise DownloadError(f"downloading {url} failed: {error}") from error
        finally:
            part.close()
