"""Loaded Piper voices and speaking with them (in worker threads)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
from piper import PiperVoice, SynthesisConfig

from lllms_core.plugin_api import (
    AudioChunk,
    ChunkSink,
    InvalidRequestError,
    SpeechRequest,
    SpeechResult,
)

ESPEAK = threading.Lock()
"""Piper phonemizes with espeak-ng, a library with one global state: one text at a time,
over the whole process."""


def voice_name(onnx: Path, config: Path) -> str:
    """A model's own voice is named by its dataset (``joe``), else by its file (``en_US-joe-medium``)."""
    dataset = json.loads(config.read_text()).get("dataset")
    return dataset if isinstance(dataset, str) and dataset else onnx.name.removesuffix(".onnx")


def _phonemizing_one_at_a_time(voice: PiperVoice) -> PiperVoice:
    phonemize = voice.phonemize

    def locked(text: str):
        with ESPEAK:
            return phonemize(text)

    voice.phonemize = locked
    return voice


class Speaker:
    def __init__(self, voices: dict[str, PiperVoice], default: str, options):
        self.voices = voices
        self.default = default
        self.options = options

    @classmethod
    def load(cls, prepared: dict[str, tuple[Path, Path]], options, device) -> "Speaker":
        voices = {
            name: _phonemizing_one_at_a_time(PiperVoice.load(onnx, config, use_cuda=device.gpu))
            for name, (onnx, config) in prepared.items()
        }
        return cls(voices, options.default_voice or next(iter(voices)), options)

    def info(self) -> dict:
        return {
            "voices": self.names(),
            "default_voice": self.default,
            "sample_rates": sorted({voice.config.sample_rate for voice in self.voices.values()}),
        }

    def names(self) -> list[str]:
        """Every voice name a request may give: each voice, and each speaker of one with several."""
        names = []
        for name, voice in self.voices.items():
            names.append(name)
            names += [f"{name}:{speaker}" for speaker in voice.config.speaker_id_map]
        return names

    def voice(self, requested: str | None) -> tuple[PiperVoice, int | None]:
        """The voice and speaker a request names: ``<voice>`` or ``<voice>:<speaker>``."""
        name, _, speaker = (requested or self.default).partition(":")
        voice = self.voices.get(name)
        speaker_id = None
        if voice is not None and speaker:
            speaker_id = voice.config.speaker_id_map.get(speaker)
        if voice is None or (speaker and speaker_id is None):
            raise InvalidRequestError(
                f"unknown voice {requested!r}; this model's voices: {', '.join(self.names())}", param="voice"
            )
        return voice, speaker_id

    def speak(self, voice: PiperVoice, speaker_id: int | None, request: SpeechRequest, sink: ChunkSink) -> SpeechResult:
        """Synthesize sentence by sentence, each sent as soon as it is ready (stops between
        sentences once the request is cancelled)."""
        config = SynthesisConfig(
            speaker_id=speaker_id,
            length_scale=voice.config.length_scale / request.speed,
            noise_scale=self.options.noise_scale,
            noise_w_scale=self.options.noise_w_scale,
        )
        rate = voice.config.sample_rate
        pause = np.zeros(int(self.options.sentence_silence * rate), dtype=np.int16).tobytes()
        samples = phonemes = 0
        for chunk in voice.synthesize(request.input, syn_config=config):
            pcm = chunk.audio_int16_bytes + pause
            sink.send_from_thread(AudioChunk(pcm=pcm, sample_rate=rate))
            samples += len(pcm) // 2
            phonemes += len(chunk.phoneme_ids)
        if not samples:  # nothing to say: one empty chunk still tells the rate
            sink.send_from_thread(AudioChunk(pcm=b"", sample_rate=rate))
        return SpeechResult(
            sample_rate=rate, samples=samples, input_tokens=phonemes, output_tokens=samples // voice.config.hop_length
        )
