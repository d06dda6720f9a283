"""Plugin discovery through entry points, the registries the hooks fill, and meta-tests
that every hook is documented and tested."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from lllms_core import hookspecs
from lllms_core.config import load_config
from lllms_core.errors import ConfigError, UnsupportedParameterError
from lllms_core.hookspecs import hookimpl
from lllms_core.plugins import PluginConflictError, get_plugin_manager
from lllms_core.samplers import Sampler, check_request
from lllms_core.schemas import ChatCompletionRequest, CompletionChunk, CompletionResult, Request, Usage, UserMessage
from lllms_core.server import ModelServer
from lllms_core.tasks import Task
from lllms_core.testing import fake, plugin_manager
from lllms_core.testing.fake import FakeEngine

ROOT = Path(__file__).parent.parent
HOOKS = sorted(name for name in dir(hookspecs) if name.startswith("register_"))


def test_hook_register_engines_finds_an_installed_engine_through_its_entry_point():
    manager = get_plugin_manager()
    assert "fake" in manager.engines
    assert manager.distributions["fake"].startswith("lllms-fake-engine ")


async def test_an_engine_from_a_plugin_serves_a_model():
    async with ModelServer({"models": {"m": {"engine": "fake", "reply": "hello from a plugin"}}}) as server:
        answer = await server.chat_completion({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.choices[0].text == "hello from a plugin"


def test_autoloading_can_be_switched_off_or_restricted(monkeypatch):
    monkeypatch.setenv("LLLMS_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "fake" not in get_plugin_manager().engines
    assert "chat-completion" in get_plugin_manager().tasks, "built-ins are always there"
    monkeypatch.delenv("LLLMS_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("LLLMS_PLUGINS", "something-else")
    assert "fake" not in get_plugin_manager().engines
    monkeypatch.setenv("LLLMS_PLUGINS", "something-else, fake")
    assert "fake" in get_plugin_manager().engines


def test_a_plugin_that_fails_to_import_is_skipped_and_reported(tmp_path, monkeypatch, caplog):
    dist = tmp_path / "lllms_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lllms-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lllms]\nbroken = lllms_broken_plugin\n")
    (tmp_path / "lllms_broken_plugin.py").write_text("raise ImportError('needs a library that is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = get_plugin_manager()
    assert "fake" in manager.engines, "the other plugins still load"
    assert "needs a library that is not installed" in manager.failed["broken"]
    assert "broken" in caplog.text


class TextToMusicRequest(Request, kw_only=True):
    model: str
    input: str


class MusicTask:
    @hookimpl
    def register_tasks(self, register):
        register(Task("text-to-music", TextToMusicRequest, "text_to_music"))


def test_hook_register_tasks_adds_a_task_type():
    manager = get_plugin_manager()
    manager.register(MusicTask())
    assert manager.tasks["text-to-music"].request is TextToMusicRequest
    assert {"chat-completion", "text-completion", "embedding", "speech-to-text", "text-to-speech", "image-to-text"} <= set(manager.tasks)


class Mirostat:
    @hookimpl
    def register_samplers(self, register):
        register(Sampler(name="mirostat", parameters=("mirostat_tau",), logits_processor=lambda value, request: None))


def test_hook_register_samplers_adds_a_sampler_that_only_engines_applying_logits_processors_accept():
    manager = get_plugin_manager()
    manager.register(Mirostat())
    assert "mirostat_tau" in manager.completion_parameters
    request = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "hi"}], plugin_parameters={"mirostat_tau": 5.0}
    )
    request = msgspec.convert(msgspec.to_builtins(request), ChatCompletionRequest)
    fake = manager.engines["fake"]
    task = manager.tasks["chat-completion"]
    with pytest.raises(UnsupportedParameterError) as refused:
        check_request(fake, task, manager.samplers, request, "m")
    assert refused.value.param == "mirostat_tau" and "fake" in refused.value.message

    class WithLogits(fake):
        logits_processors = True

    check_request(WithLogits, task, manager.samplers, request, "m")


def test_a_builtin_sampler_the_engine_lacks_is_refused_naming_parameter_and_engine():
    manager = get_plugin_manager()
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], top_k=0)
    with pytest.raises(UnsupportedParameterError) as refused:
        check_request(manager.engines["fake"], manager.tasks["chat-completion"], manager.samplers, request, "m")
    assert refused.value.param == "top_k"
    assert refused.value.status == 400
    assert "'fake'" in refused.value.message


class Twin:
    """A second plugin registering names the fake engine's plugin and the built-ins have."""

    @hookimpl
    def register_engines(self, register):
        register(type("Twin", (FakeEngine,), {}))

    @hookimpl
    def register_samplers(self, register):
        register(Sampler(name="temperature", parameters=("temperature",)))


def test_two_plugins_registering_one_name_is_an_error_naming_both():
    manager = plugin_manager(fake, Twin())
    with pytest.raises(PluginConflictError) as engine:
        manager.engines
    assert "engine 'fake' is registered by two plugins" in engine.value.message
    assert "lllms_core.testing.fake" in engine.value.message and "Twin" in engine.value.message
    with pytest.raises(PluginConflictError) as sampler:
        manager.samplers
    assert "sampler 'temperature'" in sampler.value.message and "'lllms.samplers'" in sampler.value.message
    with pytest.raises(PluginConflictError):
        ModelServer({"models": {"m": {"engine": "fake"}}}, plugins=manager)


class ParameterEcho(FakeEngine):
    """Answers with the plugin sampler parameters its request carries."""

    name = "parameter-echo"
    logits_processors = True

    async def chat_completion(self, context, request, sink):
        await sink.send(CompletionChunk(text=json.dumps(request.plugin_parameters, sort_keys=True)))
        return CompletionResult(finish_reasons=["stop"], usage=Usage(prompt_tokens=1, completion_tokens=1))


class Banana:
    @hookimpl
    def register_engines(self, register):
        register(ParameterEcho)

    @hookimpl
    def register_samplers(self, register):
        register(Sampler(name="banana", parameters=("banana_strength",), logits_processor=lambda value, request: None))


async def test_completion_defaults_of_plugin_sampler_parameters_are_applied():
    config = {"models": {"m": {"engine": "parameter-echo", "completion_defaults": {"banana_strength": 2}}}}
    async with ModelServer(config, plugins=plugin_manager(fake, Banana())) as server:
        silent = await server.chat_completion({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        told = await server.chat_completion(
            ChatCompletionRequest(model="m", messages=[UserMessage(content="hi")], plugin_parameters={"banana_strength": 5})
        )
    assert silent.choices[0].text == '{"banana_strength": 2}'
    assert told.choices[0].text == '{"banana_strength": 5}'


def test_a_plugin_sampler_default_for_an_engine_that_cannot_apply_it_is_a_config_error():
    with pytest.raises(ConfigError) as refused:
        load_config({"models": {"m": {"engine": "fake", "completion_defaults": {"banana_strength": 2}}}},
                    plugin_manager(fake, Banana()))  # fmt: skip
    assert "banana_strength" in refused.value.message and "'fake'" in refused.value.message


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert f"### `{hook}(register)`" in docs


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook):
    names = re.findall(r"^(?:async )?def (test_\w+)", Path(__file__).read_text(), re.MULTILINE)
    assert any(name.startswith(f"test_hook_{hook}") for name in names)
