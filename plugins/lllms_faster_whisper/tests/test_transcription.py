"""Transcription and translation with real Whisper models (tiny.en and base), through the
HTTP API and the ``openai`` client, of speech made by espeak-ng and by Piper."""

from __future__ import annotations

import io
import re
import threading
import time
import wave

import httpx
import jiwer
import openai
import pytest

pytestmark = pytest.mark.timeout(300)

NORMALIZE = jiwer.Compose(
    [
        jiwer.ToLowerCase(),
        jiwer.RemovePunctuation(),
        jiwer.RemoveMultipleSpaces(),
        jiwer.Strip(),
        jiwer.ReduceToListOfListOfWords(),
    ]
)


def wer(reference: str, heard: str) -> float:
    return jiwer.wer(reference, heard, reference_transform=NORMALIZE, hypothesis_transform=NORMALIZE)


def transcribe(client, path, model="tiny", **options):
    with open(path, "rb") as file:
        return client.audio.transcriptions.create(model=model, file=file, **options)


@pytest.mark.parametrize("model", ["tiny", "base"])
@pytest.mark.parametrize("voice", ["espeak", "piper"])
def test_speech_is_heard_with_a_word_error_rate_of_at_most_ten_percent(client, model, voice, espeak_speech, piper_speech, text):
    speech = espeak_speech if voice == "espeak" else piper_speech
    heard = transcribe(client, speech, model, language="en").text
    assert wer(text, heard) <= 0.10, heard


def test_a_sentence_piper_speaks_is_heard_again_word_for_word(client):
    sentence = "Local models keep your voice on your own machine."
    audio = client.audio.speech.create(model="joe", voice="joe", input=sentence, response_format="mp3").content
    heard = client.audio.transcriptions.create(model="tiny", file=("sentence.mp3", audio, "audio/mpeg")).text
    assert NORMALIZE(heard) == NORMALIZE(sentence)


def cue_times(subtitles: str, separator: str) -> list[tuple[float, float]]:
    def seconds(stamp: str) -> float:
        hours, minutes, rest = stamp.split(":")
        whole, fraction = rest.split(separator)
        return int(hours) * 3600 + int(minutes) * 60 + int(whole) + int(fraction) / 1000

    pattern = rf"(\d\d:\d\d:\d\d{re.escape(separator)}\d\d\d) --> (\d\d:\d\d:\d\d{re.escape(separator)}\d\d\d)"
    return [(seconds(start), seconds(end)) for start, end in re.findall(pattern, subtitles)]


def assert_in_order_inside(spans: list[tuple[float, float]], duration: float) -> None:
    assert spans
    for start, end in spans:
        assert 0 <= start <= end <= duration + 0.01, (start, end, duration)
    starts = [start for start, _ in spans]
    assert starts == sorted(starts)


def wav_seconds(path) -> float:
    with wave.open(str(path)) as file:
        return file.getnframes() / file.getframerate()


def test_long_audio_is_heard_in_windows_with_words_and_segments_in_order_inside_it(client, long_speech, paragraph):
    result = transcribe(client, long_speech, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert abs(result.duration - wav_seconds(long_speech)) < 0.05 and result.duration > 30
    assert wer(paragraph, result.text) <= 0.15, result.text
    assert_in_order_inside([(s.start, s.end) for s in result.segments], result.duration)
    assert result.segments[-1].end > 30  # the second window was heard too
    words = [(w.start, w.end) for w in result.words]
    assert_in_order_inside(words, result.duration)
    assert len(result.words) == len(NORMALIZE(result.text)[0])
    assert all(earlier[1] <= later[0] + 0.01 for earlier, later in zip(words, words[1:]))


@pytest.mark.parametrize("response_format", ["srt", "vtt"])
def test_subtitles_are_in_order_inside_the_audio(client, espeak_speech, response_format):
    subtitles = transcribe(client, espeak_speech, response_format=response_format)
    separator = "," if response_format == "srt" else "."
    if response_format == "srt":
        assert subtitles.startswith("1\n")
    else:
        assert subtitles.startswith("WEBVTT\n\n")
    assert_in_order_inside(cue_times(subtitles, separator), wav_seconds(espeak_speech))


def test_streamed_deltas_join_to_the_final_text(client, long_speech, paragraph):
    with open(long_speech, "rb") as file:
        events = list(client.audio.transcriptions.create(model="tiny", file=file, stream=True))
    deltas = [event.delta for event in events if event.type == "transcript.text.delta"]
    assert [event.type for event in events[-1:]] == ["transcript.text.done"]
    assert len(deltas) > 1  # the text came in pieces, as it was heard
    assert "".join(deltas) == events[-1].text
    assert wer(paragraph, events[-1].text) <= 0.15


def test_translation_into_english_with_the_openai_client(client, espeak_speech, text):
    with open(espeak_speech, "rb") as file:
        result = client.audio.translations.create(model="base", file=file, response_format="verbose_json")
    assert result.language == "english"
    assert wer(text, result.text) <= 0.10, result.text
    with open(espeak_speech, "rb") as file:
        plain = client.audio.translations.create(model="tiny", file=file)
    assert wer(text, plain.text) <= 0.10


def test_voice_activity_filter_leaves_out_silence_and_keeps_the_times_of_the_audio(client, tmp_path, espeak_speech, text):
    with wave.open(str(espeak_speech)) as source:
        params, frames = source.getparams(), source.readframes(source.getnframes())
    padded = tmp_path / "late.wav"
    silence = 8
    with wave.open(str(padded), "wb") as target:
        target.setparams(params)
        target.writeframes(b"\0" * (params.sampwidth * params.framerate * silence) + frames)
    result = transcribe(
        client, padded, response_format="verbose_json", extra_body={"vad_filter": True}
    )
    assert wer(text, result.text) <= 0.10
    assert result.segments[0].start >= silence - 0.5


def test_an_instance_transcribes_two_requests_at_once(server, client, espeak_speech):
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(transcribe(client, espeak_speech).text)) for _ in range(2)]
    for thread in threads:
        thread.start()
    most_busy = 0
    while any(thread.is_alive() for thread in threads):
        status = httpx.get(server.url("/"), timeout=10).json()
        for instance in status["instances"]:
            if instance["model"] == "tiny":
                most_busy = max(most_busy, sum(slot["busy"] for slot in instance["slots"]))
        time.sleep(0.05)
    assert most_busy == 2
    assert len(results) == 2 and results[0] == results[1]
    tiny = [instance for instance in status["instances"] if instance["model"] == "tiny"]
    assert len(tiny) == 1 and tiny[0]["info"]["workers"] == 2


def test_what_is_not_audio_or_not_understood_is_a_bad_request(client):
    for name, content in [("notes.wav", b"these are not sounds"), ("empty.mp3", b""), ("picture.png", PNG)]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.audio.transcriptions.create(model="tiny", file=(name, content))
        assert refused.value.body["param"] == "file", name
    with open(__file__, "rb") as file:
        with pytest.raises(openai.BadRequestError):
            client.audio.transcriptions.create(model="tiny", file=file)
    speech = client.audio.speech.create(model="joe", voice="joe", input="Bonjour.", response_format="wav").content
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="tiny", file=("fr.wav", speech), language="fr")
    assert refused.value.body["param"] == "language"  # tiny.en hears English only
    with pytest.raises(openai.BadRequestError) as refused:
        client.audio.transcriptions.create(model="base", file=("x.wav", speech), language="klingon")
    assert refused.value.body["param"] == "language"


PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6300010000050001"
    "0d0a2db40000000049454e44ae426082"
)


def test_a_silent_file_is_heard_as_nothing(client):
    silence = io.BytesIO()
    with wave.open(silence, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(16000)
        file.writeframes(b"\0" * 32000)
    result = client.audio.transcriptions.create(
        model="tiny", file=("silence.wav", silence.getvalue()), extra_body={"vad_filter": True}
    )
    assert result.text == ""
