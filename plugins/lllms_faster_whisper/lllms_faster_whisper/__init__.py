"""The ``faster-whisper`` engine: Whisper speech-to-text and translation on CTranslate2.

A model is a CTranslate2 Whisper folder (``model.bin``, ``config.json``,
``tokenizer.json``, ``vocabulary.txt``): a path, a ``package://`` folder, or a file
set the store assembles (``files``, e.g. a ``model.bin`` split in parts). The core
decodes the upload (16 kHz mono); faster-whisper cuts long audio into 30 s windows,
each decoded with the text before it as context. Segments are sent as they are
decoded, so ``stream: true`` shows the text while the rest is still being heard.

An instance runs ``parallel`` requests at once, one CTranslate2 worker each.
faster_whisper is imported when a model is loaded, never when this module is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import trio

from lllms_core.plugin_api import (
    Choice,
    Device,
    Engine,
    EngineInstance,
    cpu_threads,
    hookimpl,
    import_module,
    log_choices,
    ModelLoadError,
)

MODEL_FILES = ("model.bin", "config.json")


class FasterWhisperOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of a ``faster-whisper`` model (flat in its table)."""

    parallel: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Requests an instance transcribes at once (CTranslate2 workers); default: one per two physical cores this process may use (affinity and cgroup quota respected)."""
    compute_type: str = "default"
    """CTranslate2's computation type: ``default`` (the weights' own, float32 on a CPU for
    float16 weights), ``int8`` (about twice as fast on a CPU, less accurate: tiny.en mishears
    more), ``auto`` (the fastest the machine supports), ``float32``, ``float16``..."""
    beam_size: Annotated[int, msgspec.Meta(ge=1)] = 5
    """Beams searched per window (1: greedy, fastest)."""
    vad_filter: bool = False
    """Leave out the parts without speech when a request does not say (``vad_filter``)."""
    condition_on_previous_text: bool = True
    """Give each 30 s window the text of the one before as context."""
    chunk_length: Annotated[int, msgspec.Meta(ge=1, le=30)] | None = None
    """Seconds per window; default: the model's (30)."""


class WhisperInstance(EngineInstance):
    """A loaded model (``transcriber``) with ``parallel`` slots."""

    def info(self) -> dict:
        return self.transcriber.info() if self.transcriber is not None else {}


class FasterWhisperEngine(Engine):
    name = "faster-whisper"
    tasks = frozenset({"speech-to-text"})
    default_task = "speech-to-text"
    options = FasterWhisperOptions
    capabilities = frozenset({"temperature", "translate", "word_timestamps", "vad_filter"})
    audio_sample_rate = 16000

    async def prepare_model(self, model, location: Path | None):
        if location is None or not location.is_dir():
            raise ModelLoadError(
                f"model {model.id!r}: a faster-whisper model is a CTranslate2 folder ({', '.join(MODEL_FILES)}); "
                f"{location} is not a folder"
            )
        missing = [name for name in MODEL_FILES if not (location / name).is_file()]
        if missing:
            raise ModelLoadError(f"model {model.id!r}: the folder {location} has no {', '.join(missing)}")
        return location

    async def create_instance(self, model, prepared: Path, device: Device) -> EngineInstance:
        Transcriber = (await import_module("lllms_faster_whisper.transcriber")).Transcriber
        options: FasterWhisperOptions = model.options
        cores = cpu_threads(None)  # the physical cores this process may use
        parallel = (
            Choice(options.parallel, "parallel", user=True)
            if options.parallel
            else Choice(max(1, cores.value // 2), f"one worker per two of {cores.value} cores ({cores.reason})")
        )
        threads = (
            cpu_threads(device.cpu_threads)
            if device.cpu_threads
            else Choice(max(1, cores.value // parallel.value), f"{cores.value} cores shared by {parallel.value} workers")
        )
        log_choices(model.id, {"parallel": parallel, "cpu_threads": threads})
        parallel, threads = parallel.value, threads.value
        transcriber = await trio.to_thread.run_sync(
            Transcriber.load, prepared, options, "cuda" if device.gpu else "cpu", threads, parallel
        )
        return WhisperInstance(slots=parallel, limiter=trio.CapacityLimiter(parallel), transcriber=transcriber)

    def gpu_available(self) -> bool:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0

    async def dispose_instance(self, instance: EngineInstance) -> None:
        instance.transcriber = None

    async def speech_to_text(self, context, request):
        return await self.stream_speech_to_text(context, request, None)

    async def stream_speech_to_text(self, context, request, sink):
        transcriber = context.instance.transcriber
        return await trio.to_thread.run_sync(
            transcriber.transcribe, context.audio, request, context.model.options, sink, limiter=context.instance.limiter
        )


@hookimpl
def register_engines(register):
    register(FasterWhisperEngine)
