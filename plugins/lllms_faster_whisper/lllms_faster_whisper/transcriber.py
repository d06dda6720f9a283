"""A loaded faster-whisper model and what a request asks of it (runs in worker threads)."""

from __future__ import annotations

from pathlib import Path

import trio
from faster_whisper import WhisperModel
from faster_whisper.tokenizer import _LANGUAGE_CODES

from lllms_core.plugin_api import (
    ChunkSink,
    CompletionChunk,
    DecodedAudio,
    InvalidRequestError,
    TranscriptionRequest,
    TranscriptionResult,
    TranscriptionSegment,
    TranscriptionWord,
)

FALLBACK_STEP = 0.2
"""Whisper's temperature fallback: a window whose decoding fails its checks is decoded
again this much hotter, up to 1."""


def temperatures(requested: float | None) -> tuple[float, ...]:
    start = requested or 0.0
    steps = int(round((1.0 - start) / FALLBACK_STEP))
    return tuple(round(start + FALLBACK_STEP * step, 2) for step in range(steps + 1)) or (start,)


class Transcriber:
    def __init__(self, model: WhisperModel, compute_type: str, threads: int, workers: int):
        self.model = model
        self.compute_type = compute_type
        self.threads = threads
        self.workers = workers

    @classmethod
    def load(cls, folder: Path, options, device: str, threads: int, workers: int) -> "Transcriber":
        model = WhisperModel(
            str(folder),
            device=device,
            compute_type=options.compute_type,
            cpu_threads=threads,
            num_workers=workers,
            local_files_only=True,
        )
        return cls(model, options.compute_type, threads, workers)

    def info(self) -> dict:
        return {
            "multilingual": self.model.model.is_multilingual,
            "compute_type": self.compute_type,
            "cpu_threads": self.threads,
            "workers": self.workers,
        }

    def language(self, language: str | None) -> str | None:
        if language is None:
            return None
        code = language.strip().lower()
        if not self.model.model.is_multilingual:
            if code not in ("en", "english"):
                raise InvalidRequestError(
                    f"this model knows English only; it cannot hear {language!r}", param="language"
                )
            return "en"
        if code not in _LANGUAGE_CODES:
            raise InvalidRequestError(
                f"unknown language {language!r}: give an ISO-639-1 code such as 'en' or 'fr'", param="language"
            )
        return code

    def transcribe(
        self, audio: DecodedAudio, request: TranscriptionRequest, options, sink: ChunkSink | None
    ) -> TranscriptionResult:
        """Transcribe; each segment's text goes to ``sink`` (if any) as soon as it is decoded.
        Stops between segments once the request is cancelled."""
        segments, info = self.model.transcribe(
            audio.samples,
            language=self.language(request.language),
            task=request.task,
            initial_prompt=request.prompt or None,
            temperature=temperatures(request.temperature),
            beam_size=options.beam_size,
            word_timestamps=request.word_timestamps,
            vad_filter=options.vad_filter if request.vad_filter is None else request.vad_filter,
            condition_on_previous_text=options.condition_on_previous_text,
            chunk_length=options.chunk_length,
        )
        found: list[TranscriptionSegment] = []
        words: list[TranscriptionWord] = []
        text = ""
        for segment in segments:  # decoding happens as the generator is consumed
            piece = segment.text if text else segment.text.lstrip()
            text += piece
            found.append(
                TranscriptionSegment(
                    id=len(found),
                    seek=segment.seek,
                    start=round(float(segment.start), 3),
                    end=round(float(segment.end), 3),
                    text=segment.text,
                    tokens=list(segment.tokens),
                    temperature=float(segment.temperature or 0.0),
                    avg_logprob=float(segment.avg_logprob),
                    compression_ratio=float(segment.compression_ratio),
                    no_speech_prob=float(segment.no_speech_prob),
                )
            )
            words += [
                TranscriptionWord(
                    word=word.word,
                    start=round(float(word.start), 3),
                    end=round(float(word.end), 3),
                    probability=float(word.probability),
                )
                for word in segment.words or ()
            ]
            if sink is not None and piece:
                sink.send_from_thread(CompletionChunk(text=piece))
            else:
                trio.from_thread.check_cancelled()
        return TranscriptionResult(
            text=text,
            language=info.language,
            duration=round(audio.duration, 3),
            segments=found,
            words=words,
        )
