"""Audio in the core: decoding uploads with limits, encoding speech, and the audio routes
(driven by the fake engine, which speaks tones: this tests the core, not a voice)."""

from __future__ import annotations

import base64
import io
import json
import time
import wave

import httpx
import openai
import pytest
from helpers.openai_schema import openai_client
from helpers.sound import tone_wav

from lllms_core.audio import PCM_RATE, AudioEncoder, decode_audio
from lllms_core.config import AudioConfig
from lllms_core.errors import InvalidRequestError, PayloadTooLargeError

pytestmark = pytest.mark.timeout(60)


def encoded(response_format: str, seconds: float = 1.0, rate: int = 22050) -> bytes:
    with wave.open(io.BytesIO(tone_wav(seconds, rate))) as source:
        pcm = source.readframes(source.getnframes())
    encoder = AudioEncoder(response_format, rate)
    half = len(pcm) // 4 * 2
    return encoder.encode(pcm[:half]) + encoder.encode(pcm[half:]) + encoder.finish()


@pytest.mark.parametrize("response_format", ["mp3", "opus", "aac", "flac", "wav"])
def test_what_the_encoder_writes_decodes_to_the_same_length(response_format):
    decoded = decode_audio(encoded(response_format, 1.5), 16000)
    assert decoded.sample_rate == 16000 and decoded.samples.dtype.name == "float32"
    assert abs(decoded.duration - 1.5) < 0.1
    assert 0.1 < abs(decoded.samples).max() <= 1.0


def test_pcm_is_resampled_to_24_khz():
    assert len(encoded("pcm", 1.0)) == pytest.approx(2 * PCM_RATE, rel=0.01)


def test_stereo_at_any_rate_becomes_mono_at_the_engines_rate():
    decoded = decode_audio(tone_wav(2.0, rate=44100, channels=2), 16000)
    assert decoded.source_rate == 44100 and decoded.source_channels == 2
    assert len(decoded.samples) == pytest.approx(32000, abs=50)


@pytest.mark.parametrize(
    "data",
    [b"", b"these are not sounds", bytes.fromhex("89504e470d0a1a0a0000000d49484452"), b"RIFF" + bytes(100)],
    ids=["empty", "text", "png", "broken-wav"],
)
def test_what_is_not_audio_is_a_bad_request_naming_the_file(data):
    with pytest.raises(InvalidRequestError) as refused:
        decode_audio(data)
    assert refused.value.status == 400 and refused.value.param == "file"


def test_limits_on_size_and_duration():
    with pytest.raises(PayloadTooLargeError):
        decode_audio(tone_wav(1.0), limits=AudioConfig(max_bytes=1000))
    with pytest.raises(InvalidRequestError, match="longer than the limit of 2 seconds"):
        decode_audio(tone_wav(3.0), limits=AudioConfig(max_seconds=2))
    assert decode_audio(tone_wav(1.0), limits=AudioConfig(max_seconds=2)).duration == pytest.approx(1.0, abs=0.01)


# --- the routes, with the fake engine ------------------------------------------------


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(
        {
            "audio": {"max_seconds": 60},
            "models": {
                "ears": {"engine": "fake", "task": "speech-to-text"},
                "voice": {"engine": "fake", "task": "text-to-speech", "token_delay": 0.05},
            },
        }
    )


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai_client(server.url("/v1"), "unused")


def test_translations_and_streamed_transcriptions(client):
    wav = tone_wav(0.5)
    translated = client.audio.translations.create(model="ears", file=("a.wav", wav), response_format="verbose_json")
    assert translated.text == f"fake transcription of {len(wav)} bytes" and translated.language == "english"
    events = list(client.audio.transcriptions.create(model="ears", file=("a.wav", wav), stream=True))
    assert [event.type for event in events] == ["transcript.text.delta", "transcript.text.done"]
    assert events[0].delta == events[1].text == translated.text


def test_audio_over_the_duration_limit_is_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="ears", file=("long.wav", tone_wav(61, rate=8000)))
    assert refused.value.body["code"] == "invalid_audio"


def test_speech_in_each_format_and_as_events(client, server):
    for response_format in ("mp3", "opus", "aac", "flac", "wav"):
        audio = client.audio.speech.create(model="voice", voice="high", input="one two three", response_format=response_format).content
        # mp3 and aac add an encoder delay of a few frames
        assert decode_audio(audio).duration == pytest.approx(0.3, abs=0.12), response_format
    body = {"model": "voice", "input": "one two three four", "response_format": "pcm", "stream_format": "sse"}
    with httpx.stream("POST", server.url("/v1/audio/speech"), json=body, timeout=20) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    kinds = [event["type"] for event in events]
    assert kinds[-1] == "speech.audio.done" and set(kinds[:-1]) == {"speech.audio.delta"} and len(kinds) >= 5
    assert sum(len(base64.b64decode(event["audio"])) for event in events[:-1]) == pytest.approx(0.4 * PCM_RATE * 2, rel=0.02)
    assert events[-1]["usage"] == {"input_tokens": 4, "output_tokens": 4, "total_tokens": 8}


def test_an_unknown_voice_is_a_bad_request_before_any_audio(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="voice", voice="alloy", input="hello")
    assert refused.value.body["param"] == "voice"
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.speech.create(model="ears", voice="low", input="hello")
    assert refused.value.body["param"] == "model"


def test_a_client_that_leaves_a_speech_stream_frees_the_slot(client, server):
    with client.audio.speech.with_streaming_response.create(
        model="voice", voice="low", input=" ".join(["word"] * 200), response_format="pcm"
    ) as response:
        next(response.iter_bytes())
    for _ in range(100):
        status = httpx.get(server.url("/")).json()
        if status["processing"] == 0:
            break
        time.sleep(0.05)
    assert status["processing"] == 0


def test_what_the_engine_cannot_hear_is_refused_naming_the_parameter(client):
    wav = ("a.wav", tone_wav(0.2))
    for options, param in [
        ({"timestamp_granularities": ["word"], "response_format": "verbose_json"}, "timestamp_granularities"),
        ({"extra_body": {"vad_filter": True}}, "vad_filter"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(model="ears", file=wav, **options)
        assert refused.value.body["code"] == "unsupported_parameter" and refused.value.body["param"] == param
