"""The ``lllms`` command, run as a user runs it: the installed script in a subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from helpers.fileserver import FileServer

pytestmark = pytest.mark.timeout(120)

LLLMS = str(Path(sys.executable).with_name("lllms"))
ENV = {key: value for key, value in os.environ.items() if not key.startswith("LLLMS_")}


def lllms(*args: str, timeout: float = 60, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LLLMS, *args], capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})}, **kwargs
    )


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string of plain text is a TOML basic string


def write_config(path: Path, server: dict | None = None, http: dict | None = None, **models: dict) -> Path:
    lines = []
    for table, values in (("server", server), ("http", http)):
        lines += [f"[{table}]"] + [f"{key} = {toml_value(value)}" for key, value in (values or {}).items()]
    for model_id, spec in models.items():
        lines.append(f"[models.{json.dumps(model_id)}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in {"engine": "fake", **spec}.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def test_help_is_fast_and_imports_no_engine_or_web_framework():
    heavy = ["llama_cpp", "torch", "gpt4all", "transformers", "quart", "hypercorn", "trio", "rich", "httpx",
             "lllms_core.plugins"]
    script = (
        "import sys, json\n"
        "from lllms_core.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        f"print(json.dumps([name for name in {heavy!r} if name in sys.modules]))\n"
    )
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, env=ENV)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert "usage: lllms" in result.stdout
    assert time.monotonic() - started < 10

    help_text = lllms("--help")
    assert help_text.returncode == 0
    for command in ("serve", "pull", "ps", "run", "plugins"):
        assert command in help_text.stdout


def installed_plugin(site: Path, name: str, version: str, code: str) -> dict[str, str]:
    """A plugin distribution ``lllms-<name>`` whose entry point ``name`` is the module
    ``lllms_<name>`` holding ``code``, in ``site``; the environment that sees it."""
    info = site / f"lllms_{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: lllms-{name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[lllms]\n{name} = lllms_{name}\n")
    (site / f"lllms_{name}.py").write_text(code)
    return {"PYTHONPATH": str(site)}


def test_plugins_lists_the_fake_engine_and_a_plugin_that_failed_to_load(tmp_path):
    code = "raise ImportError('lllms_broken needs libfoo, which is not installed')\n"
    env = installed_plugin(tmp_path / "site", "broken", "0.1", code)

    result = lllms("plugins", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"name": "fake", "distribution": "lllms-fake-engine", "version": "0.1.0"} in report["plugins"]
    fake = next(engine for engine in report["engines"] if engine["name"] == "fake")
    assert fake["plugin"] == "fake"
    assert {"chat-completion", "text-completion", "embedding"} <= set(fake["tasks"])
    assert "slots" in fake["options"]
    assert {task["name"] for task in report["tasks"]} >= {"chat-completion", "embedding"}
    assert any(sampler["name"] == "temperature" for sampler in report["samplers"])
    assert report["failed"] == [{"name": "broken", "error": "ImportError: lllms_broken needs libfoo, which is not installed"}]

    table = lllms("plugins", env={**env, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "lllms-fake-engine" in table.stdout
    assert "Failed to load" in table.stdout and "needs libfoo" in table.stdout


def test_two_plugins_registering_one_engine_name_is_an_error_naming_both(tmp_path):
    code = (
        "from lllms_core.plugin_api import hookimpl\n"
        "from lllms_core.testing.fake import FakeEngine\n\n"
        "class Twin(FakeEngine):\n    pass\n\n"
        "@hookimpl\ndef register_engines(register):\n    register(Twin)\n"
    )
    env = installed_plugin(tmp_path / "site", "twin", "0.2", code)
    for args in (["plugins"], ["run", "m", "hi"]):
        result = lllms(*args, env=env)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1, result.stderr
        assert "engine 'fake' is registered by two plugins" in result.stderr
        assert "'fake' (lllms-fake-engine 0.1.0)" in result.stderr and "'twin' (lllms-twin 0.2)" in result.stderr
    chosen = lllms("plugins", "--json", env={**env, "LLLMS_PLUGINS": "fake"})
    assert chosen.returncode == 0, chosen.stderr
    plugins = [engine["plugin"] for engine in json.loads(chosen.stdout)["engines"]]
    assert [plugin for plugin in plugins if not plugin.startswith("lllms.")] == ["fake"]  # besides the built-in engines


def test_run_streams_the_answer_of_a_chat_model_and_of_a_text_model(tmp_path, cache):
    config = write_config(
        tmp_path / "lllms.toml",
        server={"cache_dir": str(cache)},
        chat={"reply": "Hello from the fake engine"},
        story={"task": "text-completion"},
        echo={},
    )
    chat = lllms("run", "chat", "hi", "--config", str(config), "--system", "Be brief.", "--temperature", "0.5")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == "Hello from the fake engine\n"
    assert chat.stderr == ""  # no download, no progress bar, nothing logged

    echo = lllms("run", "echo", "what a day", "--config", str(config))
    assert echo.stdout == "You said: what a day\n"

    story = lllms("run", "story", "Once upon a time", "--max-tokens", "3", env={"LLLMS_CONFIG": str(config)})
    assert story.returncode == 0, story.stderr
    assert story.stdout == "and then the\n"

    piped = lllms("run", "echo", "--config", str(config), input="from a pipe")
    assert piped.stdout == "You said: from a pipe\n"


def test_run_refuses_an_unknown_model_and_an_embedding_model_in_one_line(tmp_path, cache):
    config = write_config(tmp_path / "lllms.toml", server={"cache_dir": str(cache)}, chat={}, vectors={"task": "embedding"})
    unknown = lllms("run", "nope", "hi", "--config", str(config))
    assert unknown.returncode == 1
    assert unknown.stderr == "lllms: error: no model 'nope' in the configuration (configured: chat, vectors)\n"
    embedding = lllms("run", "vectors", "hi", "--config", str(config))
    assert embedding.returncode == 1
    assert "needs a chat-completion or text-completion model" in embedding.stderr
    assert len(embedding.stderr.splitlines()) == 1


def test_run_reports_a_model_that_fails_to_load_and_a_bad_parameter_without_a_traceback(tmp_path, cache):
    config = write_config(tmp_path / "lllms.toml", server={"cache_dir": str(cache)}, broken={"fail_loads": 5}, chat={})
    broken = lllms("run", "broken", "hi", "--config", str(config))
    assert broken.returncode == 1
    assert broken.stderr.splitlines()[-1] == "lllms: error: fake model 'broken' refuses to load"
    assert "Traceback" not in broken.stderr
    hot = lllms("run", "chat", "hi", "--temperature", "9", "--config", str(config))
    assert hot.returncode == 1
    assert hot.stderr.startswith("lllms: error: ") and "temperature" in hot.stderr
    assert len(hot.stderr.splitlines()) == 1


def test_a_config_error_names_the_field(tmp_path):
    config = write_config(tmp_path / "lllms.toml", chat={"slots": 1, "sltos": 2})
    result = lllms("run", "chat", "hi", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith("lllms: error: ")
    assert "sltos" in result.stderr and len(result.stderr.splitlines()) == 1


def test_pull_downloads_verifies_and_logs_in_logfmt(tmp_path, cache):
    content = os.urandom(300_000)
    with FileServer(tmp_path / "www") as files:
        url = files.add("/models/tiny.gguf", content)
        config = write_config(
            tmp_path / "lllms.toml",
            server={"cache_dir": str(cache)},
            tiny={"url": url, "sha256": hashlib.sha256(content).hexdigest()},
        )
        result = lllms("--log-level", "info", "pull", "tiny", "--config", str(config))
        again = lllms("pull", "tiny", "--config", str(config))
        gets = len(files.gets("/models/tiny.gguf"))

    assert result.returncode == 0, result.stderr
    location = cache / "127.0.0.1" / "models" / "tiny.gguf"
    assert result.stdout == f"✓ tiny: {location} (sha256 verified)\n"
    assert location.read_bytes() == content
    assert "level=info logger=lllms.store msg=" in result.stderr
    assert "tiny.gguf" in result.stderr and "300.0/300.0 kB" in result.stderr  # the finished progress bar

    assert again.returncode == 0 and again.stdout == result.stdout
    assert gets == 1  # the verified file was not downloaded again


def test_pull_with_a_wrong_sha256_fails_in_one_line_and_leaves_no_file(tmp_path, cache):
    content = b"not the expected model" * 1000
    with FileServer(tmp_path / "www") as files:
        url = files.add("/m.bin", content)
        config = write_config(tmp_path / "lllms.toml", server={"cache_dir": str(cache)}, m={"url": url, "sha256": "0" * 64})
        result = lllms("pull", "m", "--config", str(config))

    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("lllms: error:")]
    assert len(error_lines) == 1
    assert "sha256 checksum mismatch" in error_lines[0]
    assert hashlib.sha256(content).hexdigest() in error_lines[0]
    assert result.stdout == ""
    leftovers = [path.name for path in cache.rglob("m.bin*") if not path.name.endswith(".lock")]
    assert leftovers == []


def test_pull_all_pulls_every_model_and_reports_the_ones_that_failed(tmp_path, cache):
    content = b"weights" * 1000
    with FileServer(tmp_path / "www") as files:
        url = files.add("/w.bin", content)
        config = write_config(
            tmp_path / "lllms.toml",
            server={"cache_dir": str(cache)},
            good={"url": url, "sha256": hashlib.sha256(content).hexdigest()},
            bad={"url": url, "file": "elsewhere/w.bin", "md5": "0" * 32},
            fileless={},
        )
        result = lllms("pull", "--all", "--config", str(config))

    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"✓ good: {cache / '127.0.0.1' / 'w.bin'} (sha256 verified)",
        "✓ fileless: ready (engine 'fake' needs no model file)",
    ]
    assert "✗ bad: md5 checksum mismatch" in result.stderr
    assert result.stderr.splitlines()[-1] == "lllms: error: 1 of 3 models failed"


def test_pull_needs_a_model_or_all(tmp_path):
    config = write_config(tmp_path / "lllms.toml", chat={})
    result = lllms("pull", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr == "lllms: error: name one model, or use --all\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ps_of_an_unreachable_server_fails_in_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    result = lllms("ps", "--url", url)
    assert result.returncode == 1
    assert result.stderr.startswith(f"lllms: error: cannot reach the server at {url}/")
    assert len(result.stderr.splitlines()) == 1


def test_serve_on_a_port_in_use_fails_in_one_line(tmp_path, cache):
    config = write_config(tmp_path / "lllms.toml", server={"cache_dir": str(cache)}, chat={})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = lllms("serve", "--config", str(config), "--port", str(port), timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"lllms: error: cannot serve on 127.0.0.1:{port}: Address already in use"
    assert "Traceback" not in result.stderr


def test_serve_then_ps_shows_instances_and_downloads_and_sigterm_stops_it(tmp_path, cache):
    port = free_port()
    with FileServer(tmp_path / "www") as files:
        files.rate = 200_000  # bytes/s: the 4 MB download lasts the whole test
        big = files.add("/big.gguf", bytes(4_000_000))
        config = write_config(
            tmp_path / "lllms.toml",
            server={"cache_dir": str(cache)},
            chat={"min_instances": 1, "slots": 2},
            big={"url": big, "prepare": "async"},
        )
        server = subprocess.Popen(
            [LLLMS, "serve", "--config", str(config), "--port", str(port)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                assert server.poll() is None, server.communicate()[1]
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not become healthy in 30 s"
                time.sleep(0.1)
            while not files.gets("/big.gguf"):
                assert time.monotonic() < deadline, "the download did not start"
                time.sleep(0.05)
            time.sleep(0.5)  # some bytes arrive

            raw = lllms("ps", "--url", url, "--json")
            assert raw.returncode == 0, raw.stderr
            status = json.loads(raw.stdout)
            [instance] = status["instances"]
            assert instance["model"] == "chat" and instance["state"] == "idle" and len(instance["slots"]) == 2
            assert status["models"]["big"]["state"] == "preparing"
            [download] = status["models"]["big"]["downloads"]
            assert download["total"] == 4_000_000 and 0 < download["percent"] < 100

            table = lllms("ps", "--url", url, env={"COLUMNS": "200"})
            assert table.returncode == 0, table.stderr
            assert instance["id"] in table.stdout and "0/2" in table.stdout
            assert "0 queued" in table.stdout
            assert "% of 4.0 MB at " in table.stdout
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                _, stderr = server.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                raise
    assert server.returncode == 0, stderr
    assert 'level=warning logger=lllms.http msg="SIGTERM' in stderr  # quiet by default: warnings, as logfmt
