"""Speech to text through the HTTP API with the openai client.

The model is a TINY randomly initialised Whisper (see conftest): its words are noise.
These tests check what does not depend on words: every response format, segments and
their times, the language, and that audio longer than 30 s is transcribed in windows
over its whole length.
"""

from __future__ import annotations

import numpy as np
import openai
import pytest

from lllms_core.audio import decode_audio
from lllms_transformers.speech import SAMPLE_RATE, WINDOW, windows

pytestmark = pytest.mark.timeout(180)


def transcribe(client, path, **kwargs):
    with open(path, "rb") as file:
        return client.audio.transcriptions.create(model="whisper", file=file, **kwargs)


def test_json(client, speech):
    result = transcribe(client, speech, response_format="json")
    assert isinstance(result.text, str) and result.text


def test_text(client, speech):
    result = transcribe(client, speech, response_format="text")
    assert isinstance(result, str) and result.strip()


def test_verbose_json_has_segments_within_the_audio(client, speech):
    result = transcribe(client, speech, response_format="verbose_json", language="en")
    assert result.language == "english"
    assert 4 < result.duration < 7
    assert result.segments
    for segment in result.segments:
        assert 0 <= segment.start <= segment.end <= result.duration + 0.01


def test_srt(client, speech):
    result = transcribe(client, speech, response_format="srt")
    assert result.startswith("1\n")
    assert "00:00:" in result and " --> " in result


def test_vtt(client, speech):
    result = transcribe(client, speech, response_format="vtt", prompt="fox and dog", temperature=0.3)
    assert result.startswith("WEBVTT")
    assert " --> " in result


def test_an_unknown_language_or_a_file_that_is_not_audio_is_a_bad_request(client, speech, tmp_path):
    with pytest.raises(openai.BadRequestError) as refused:
        transcribe(client, speech, language="klingon")
    assert refused.value.body["param"] == "language"
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("these are not sounds")
    with pytest.raises(openai.BadRequestError) as refused:
        transcribe(client, not_audio)
    assert refused.value.body["param"] == "file"


def test_long_audio_is_cut_in_windows_at_quiet_moments():
    tone = np.sin(np.arange(75 * SAMPLE_RATE) / 10).astype(np.float32)
    tone[27 * SAMPLE_RATE : 27 * SAMPLE_RATE + SAMPLE_RATE // 5] = 0  # a pause near the end of the first window
    spans = windows(tone)
    assert spans[0] == (0, spans[0][1]) and spans[-1][1] == len(tone)
    assert all(end - start <= WINDOW for start, end in spans)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert 27 * SAMPLE_RATE <= spans[0][1] <= 27 * SAMPLE_RATE + SAMPLE_RATE // 5
    assert len(spans) == 3


def test_long_audio_is_transcribed_over_its_whole_length(client, long_speech):
    audio = decode_audio(long_speech.read_bytes(), SAMPLE_RATE).samples
    spans = windows(audio)
    assert len(spans) == 2  # about 39 s: two windows
    result = transcribe(client, long_speech, response_format="verbose_json")
    assert result.duration > 30
    starts = [segment.start for segment in result.segments]
    second_window = spans[1][0] / SAMPLE_RATE
    assert min(starts) < second_window <= max(starts)  # not cut to the first (or last) 30 s
    assert max(segment.end for segment in result.segments) <= result.duration + 0.01


def test_translation_into_english(client, speech):
    with open(speech, "rb") as file:
        result = client.audio.translations.create(model="whisper", file=file, response_format="verbose_json")
    assert result.language == "english" and isinstance(result.text, str)
    assert result.segments and result.duration > 4
