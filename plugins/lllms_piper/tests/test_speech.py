"""Text to speech with a real Piper voice, through the HTTP API and the ``openai`` client:
every format decodes back to speech of the right length, audio streams as it is
synthesized (as bytes and as server-sent events), and bad requests get 4xx."""

from __future__ import annotations

import base64
import json

import httpx
import openai
import pytest

from lllms_core.audio import PCM_RATE, decode_audio

pytestmark = pytest.mark.timeout(120)

TEXT = "The quick brown fox jumps over the lazy dog. Local models are private and fast."
SENTENCES = "One sentence here. Another one there. And a third to end."


def seconds_of(audio: bytes) -> float:
    return decode_audio(audio).duration


@pytest.fixture(scope="module")
def wav_seconds(client) -> float:
    return seconds_of(client.audio.speech.create(model="joe", voice="joe", input=TEXT, response_format="wav").content)


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav"])
def test_each_format_holds_the_speech(client, response_format, wav_seconds):
    response = client.audio.speech.create(model="joe", voice="joe", input=TEXT, response_format=response_format)
    expected = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav"}
    assert response.response.headers["content-type"] == expected[response_format]
    audio = response.content
    assert decode_audio(audio).source_format.split(",")[0] in {"mp3", "ogg", "aac", "flac", "wav"}
    # Piper varies its rhythm at random: the same text lasts about as long each time
    assert 3 < seconds_of(audio) < 8 and abs(seconds_of(audio) - wav_seconds) < 1.0


def test_pcm_is_16_bit_mono_at_24_khz(client, wav_seconds):
    pcm = client.audio.speech.create(model="joe", voice="joe", input=TEXT, response_format="pcm").content
    assert len(pcm) % 2 == 0
    assert abs(len(pcm) / 2 / PCM_RATE - wav_seconds) < 1.0


def test_speed_changes_how_long_the_speech_lasts(client):
    normal = seconds_of(client.audio.speech.create(model="joe", voice="joe", input=TEXT, response_format="wav").content)
    fast = seconds_of(client.audio.speech.create(model="joe", voice="joe", input=TEXT, speed=2.0, response_format="wav").content)
    assert fast < normal * 0.7


def test_streamed_audio_comes_a_sentence_at_a_time(client, server):
    pieces = []
    with client.audio.speech.with_streaming_response.create(
        model="duo", voice="narrator", input=SENTENCES, response_format="pcm"
    ) as response:
        for piece in response.iter_bytes(chunk_size=None):
            pieces.append(piece)
            if len(pieces) == 1:  # the first sentence arrived while the others are being spoken
                busy = [i for i in httpx.get(server.url("/")).json()["instances"] if i["model"] == "duo"]
                assert any(slot["busy"] for slot in busy[0]["slots"])
    assert len(pieces) >= 3
    quarter_second_of_silence = b"\0\0" * (PCM_RATE // 4)
    assert b"".join(pieces).count(quarter_second_of_silence) >= 3  # sentence_silence after each sentence


def test_server_sent_events_carry_the_audio_then_the_usage(server):
    body = {"model": "joe", "voice": "joe", "input": SENTENCES, "response_format": "wav", "stream_format": "sse"}
    with httpx.stream("POST", server.url("/v1/audio/speech"), json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[len("data: "):]) for line in response.iter_lines() if line.startswith("data: ")]
    deltas = [event for event in events if event["type"] == "speech.audio.delta"]
    assert len(deltas) >= 3 and events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["total_tokens"] == events[-1]["usage"]["input_tokens"] + events[-1]["usage"]["output_tokens"] > 0
    audio = b"".join(base64.b64decode(event["audio"]) for event in deltas)
    assert 2 < seconds_of(audio) < 8


def test_voices_of_a_model_and_unknown_voices(client, server):
    default = client.audio.speech.create(model="duo", voice="narrator", input="Hello there.", response_format="wav")
    assert seconds_of(default.content) > 0.3
    for model, voice in [("joe", "alloy"), ("duo", "joe:nobody"), ("joe", "narrator")]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.speech.create(model=model, voice=voice, input="Hello.")
        assert refused.value.body["param"] == "voice"
        assert "joe" in refused.value.body["message"]  # the error names the voices there are
    status = httpx.get(server.url("/")).json()
    duo = next(i for i in status["instances"] if i["model"] == "duo")
    assert duo["info"]["voices"] == ["joe", "narrator"] and duo["info"]["default_voice"] == "narrator"


def test_requests_piper_cannot_serve_are_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="joe", voice="joe", input="Hello.", instructions="Whisper it.")
    assert refused.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="joe", voice="joe", input="", response_format="wav")
    assert refused.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="joe", voice="joe", input="Hi.", speed=9)
    assert refused.value.body["param"] == "speed"
