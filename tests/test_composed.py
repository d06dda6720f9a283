"""The composed engine and the handle it calls other models with (``TaskContext.models``),
on fake models: audio parts heard by a speech model, images captioned by a vision model,
the answer streamed from a chat
model, no deadlock when the concurrency limit is reached, cancellation, cycles refused."""

from __future__ import annotations

import base64

import pytest
import trio
from helpers.sound import tone_wav

from lllms_core.errors import ConfigError, InvalidRequestError
from lllms_core.server import ModelServer

pytestmark = pytest.mark.timeout(30)

WAV = tone_wav(0.5)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def config(concurrency: int = 1, **voice) -> dict:
    return {
        "server": {"concurrency": concurrency},
        "models": {
            "ears": {"engine": "fake", "task": "speech-to-text"},
            "chat": {"engine": "fake", "token_delay": 0.01},
            "voice": {"engine": "composed", "speech_model": "ears", "chat_model": "chat", **voice},
        },
    }


def spoken(text_before: str = "") -> list[dict]:
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(WAV).decode(), "format": "wav"}}
    parts = ([{"type": "text", "text": text_before}] if text_before else []) + [audio]
    return [{"role": "user", "content": parts}]


async def test_audio_parts_are_heard_and_answered_by_the_chat_model():
    async with ModelServer(config()) as server:
        answer = await server.chat_completion({"model": "voice", "messages": spoken("Listen:")})
    assert answer.choices[0].text == f"You said: Listen:fake transcription of {len(WAV)} bytes"
    assert answer.model == "voice" and answer.usage.completion_tokens > 0


async def test_image_parts_are_captioned_by_the_vision_model():
    import io

    import PIL.Image

    png = io.BytesIO()
    PIL.Image.new("RGB", (4, 3), "red").save(png, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    composed = config(vision_model="eyes")
    composed["models"]["eyes"] = {"engine": "fake", "task": "image-to-text"}
    message = {"role": "user", "content": [{"type": "text", "text": "See:"}, {"type": "image_url", "image_url": {"url": url}}]}
    async with ModelServer(composed) as server:
        answer = await server.chat_completion({"model": "voice", "messages": [message]})
    assert answer.choices[0].text == f"You said: See:[Image: a picture of {len(png.getvalue())} bytes]"


async def test_the_models_tools_are_offered_when_a_request_brings_none():
    async with ModelServer(config(tools=[WEATHER], tool_choice="required")) as server:
        answer = await server.chat_completion({"model": "voice", "messages": spoken()})
    (call,) = answer.choices[0].tool_calls
    assert call.function.name == "get_weather" and answer.choices[0].finish_reason == "tool_calls"


async def test_composed_requests_beyond_the_concurrency_limit_do_not_deadlock():
    """Each composed request holds the only permit of the gate while its inner requests
    run; they pass the gate as part of it, so all finish, one after another."""
    answers = []
    async with ModelServer(config(concurrency=1)) as server:

        async def ask() -> None:
            answers.append(await server.chat_completion({"model": "voice", "messages": spoken()}))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(ask)
        assert server.status()["processing"] == 0 and server.status()["queued"] == 0
    assert len(answers) == 4


async def test_cancelling_a_composed_request_frees_every_slot_it_held():
    async with ModelServer(config(concurrency=2)) as server:
        with trio.move_on_after(0.3):
            async with server.stream_chat_completion({"model": "voice", "messages": spoken("x " * 200)}) as stream:
                async for _ in stream:
                    pass
        with trio.fail_after(5):
            while server.status()["processing"]:
                await trio.sleep(0.01)


async def test_models_that_call_each_other_are_refused():
    cycle = {
        "models": {
            "a": {"engine": "composed", "chat_model": "b"},
            "b": {"engine": "composed", "chat_model": "a"},
        }
    }
    async with ModelServer(cycle) as server:
        with pytest.raises(InvalidRequestError, match="calls itself"):
            await server.chat_completion({"model": "a", "messages": [{"role": "user", "content": "hi"}]})


@pytest.mark.parametrize(
    ("voice", "message"),
    [
        ({"chat_model": "nope"}, "'nope' is not another model"),
        ({"chat_model": "voice"}, "'voice' is not another model"),
        ({"speech_model": "chat"}, "'chat' is a chat-completion model, not speech-to-text"),
        ({"chat_model": "ears"}, "'ears' is a speech-to-text model, not chat-completion"),
        ({"vision_model": "chat"}, "'chat' is a chat-completion model, not image-to-text"),
    ],
)
def test_a_composed_model_must_name_models_that_can_do_their_part(voice, message):
    with pytest.raises(ConfigError, match=message):
        ModelServer(config(**voice))
