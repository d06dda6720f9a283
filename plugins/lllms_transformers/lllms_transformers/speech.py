"""Speech to text with Whisper-family models.

The core decodes the audio to 16 kHz mono (``TaskContext.audio``). Whisper hears 30 s at
a time, so longer audio is cut into windows of at most 30 s, each cut at the
quietest moment of its last seconds (so that words are seldom split), and every
window is transcribed with timestamps; segment times are shifted by the
window's start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lllms_core.plugin_api import (
    DecodedAudio,
    InvalidRequestError,
    TranscriptionRequest,
    TranscriptionResult,
    TranscriptionSegment,
)

SAMPLE_RATE = 16000
WINDOW = 30 * SAMPLE_RATE
"""Whisper's input: 30 s of audio."""
CUT_SEARCH = 5 * SAMPLE_RATE
"""How far back from a window's end to look for a quiet place to cut."""
CUT_FRAME = SAMPLE_RATE // 10
TIME_PRECISION = 0.02
"""Seconds per Whisper timestamp token."""


def windows(audio: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) sample ranges of at most 30 s covering the audio, cut where it is quietest."""
    spans = []
    start = 0
    while len(audio) - start > WINDOW:
        search_from = start + WINDOW - CUT_SEARCH
        tail = audio[search_from : start + WINDOW]
        frames = len(tail) // CUT_FRAME
        energy = (tail[: frames * CUT_FRAME].reshape(frames, CUT_FRAME) ** 2).mean(axis=1)
        end = search_from + (int(np.argmin(energy)) + 1) * CUT_FRAME
        spans.append((start, end))
        start = end
    spans.append((start, len(audio)))
    return spans


class Transcriber:
    def __init__(self, model, processor, device, max_chunk_tokens: int | None):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        config = model.generation_config
        self.timestamp_begin = config.no_timestamps_token_id + 1
        self.start_token = config.decoder_start_token_id
        self.multilingual = bool(getattr(config, "is_multilingual", False))
        self.languages = dict(getattr(config, "lang_to_id", None) or {})
        eos = config.eos_token_id
        self.first_special = min(eos) if isinstance(eos, list) else eos
        """Whisper's text tokens come before its end-of-text token; special and timestamp tokens after."""
        self.max_positions = model.config.max_target_positions
        self.max_chunk_tokens = max_chunk_tokens

    @classmethod
    def load(cls, model, prepared: Path, device, dtype) -> "Transcriber":
        from transformers import AutoModelForSpeechSeq2Seq, WhisperProcessor

        from lllms_transformers.loading import load_pretrained

        processor = WhisperProcessor.from_pretrained(prepared, local_files_only=True)
        speech = load_pretrained(AutoModelForSpeechSeq2Seq, prepared, model, device, dtype)
        return cls(speech, processor, device, model.options.max_chunk_tokens)

    def info(self) -> dict:
        return {"device": str(self.device), "multilingual": self.multilingual}

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _language_code(self, language: str | None) -> str | None:
        if language is None:
            return None
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        code = language.lower()
        code = TO_LANGUAGE_CODE.get(code, code)
        known = f"<|{code}|>" in self.languages if self.multilingual else code == "en"
        if not known:
            raise InvalidRequestError(f"the model does not know the language {language!r}", param="language")
        return code

    def _features(self, samples: np.ndarray) -> torch.Tensor:
        features = self.processor.feature_extractor(samples, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        return features.to(self.device, self.model.dtype)

    def transcribe(self, decoded: DecodedAudio, request: TranscriptionRequest) -> TranscriptionResult:
        from transformers.models.whisper.tokenization_whisper import LANGUAGES

        audio = decoded.samples
        spans = windows(audio)
        language = self._language_code(request.language)
        prompt_ids = None
        if request.prompt:
            ids = self.processor.get_prompt_ids(request.prompt, return_tensors="pt")
            keep = self.max_positions // 2 - 1
            prompt_ids = torch.cat([ids[:1], ids[1:][-(keep - 1) :]]).to(self.device)  # <|startofprev|> + the end
        budget = self.max_positions - 4 - (len(prompt_ids) if prompt_ids is not None else 0)
        max_new_tokens = min(self.max_chunk_tokens or budget, budget)
        if language is None and self.multilingual:
            start, end = spans[0]
            detected = int(self.model.detect_language(self._features(audio[start:end]))[0])
            language = self.tokenizer.convert_ids_to_tokens(detected).strip("<|>")
        options = {
            "return_timestamps": True,
            "task": request.task,
            "max_new_tokens": max_new_tokens,
        }
        if self.multilingual:
            options["language"] = language
        if prompt_ids is not None:
            options["prompt_ids"] = prompt_ids
        if request.temperature:
            options["temperature"] = request.temperature
            options["do_sample"] = True
        segments: list[TranscriptionSegment] = []
        for start, end in spans:
            with torch.inference_mode():
                sequence = self.model.generate(self._features(audio[start:end]), **options)[0].tolist()
            offset, length = start / SAMPLE_RATE, (end - start) / SAMPLE_RATE
            for seg_start, seg_end, text in self._segments(sequence, length):
                segments.append(
                    TranscriptionSegment(id=len(segments), start=round(offset + seg_start, 2), end=round(offset + seg_end, 2), text=text)
                )
        name = LANGUAGES.get(language, language) if self.multilingual else "english"
        return TranscriptionResult(
            text=" ".join(segment.text.strip() for segment in segments if segment.text.strip()),
            language=name,
            duration=round(len(audio) / SAMPLE_RATE, 2),
            segments=segments,
        )

    def _segments(self, sequence: list[int], length: float) -> list[tuple[float, float, str]]:
        """(start, end, text) of the timestamped segments of one window's output; text
        without timestamps becomes one segment spanning the window."""
        if self.start_token in sequence:
            sequence = sequence[sequence.index(self.start_token) + 1 :]
        found: list[tuple[float, float, str]] = []
        start: float | None = None
        tokens: list[int] = []

        def close(end: float) -> None:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.strip():
                found.append((min(start or 0.0, length), min(max(end, start or 0.0), length), text))

        for token in sequence:
            if token >= self.timestamp_begin:
                time = (token - self.timestamp_begin) * TIME_PRECISION
                if start is not None and tokens:
                    close(time)
                    start, tokens = None, []
                else:
                    start = time
            elif token < self.first_special:
                tokens.append(token)
        if tokens:
            close(length)
        return found
