"""The ``piper`` engine: local neural text-to-speech with Piper voices.

A model is a Piper voice (an ``.onnx`` file with its ``.onnx.json`` beside it, from a
path, a ``package://`` URL, or an http(s)/Hugging Face URL whose ``.json`` companion is
downloaded with it), plus any number of other voices (``voices``). Speech is sent a
sentence at a time as it is synthesized; the core encodes it into the requested format.

piper is imported when a model is loaded, never when this module is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec
import trio

from lllms_core.plugin_api import (
    Device,
    Engine,
    EngineInstance,
    hookimpl,
    ModelLoadError,
    import_module,
    source_fields,
)


class PiperOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of a ``piper`` model (flat in its table)."""

    voices: dict[str, str] = {}
    """More voices: name → the voice's ``.onnx`` (a path or URL, as a model's ``url``)."""
    default_voice: str | None = None
    """The voice of a request that names none; default: the model's own voice."""
    parallel: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Requests an instance speaks at once."""
    noise_scale: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Variation in the voice; default: the voice's own."""
    noise_w_scale: Annotated[float, msgspec.Meta(ge=0)] | None = None
    """Variation in the speaking rhythm; default: the voice's own."""
    sentence_silence: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.0
    """Seconds of silence after each sentence."""


class PiperInstance(EngineInstance):
    """The loaded voices (``speaker``) with ``parallel`` slots."""

    def info(self) -> dict:
        return self.speaker.info() if self.speaker is not None else {}


class PiperEngine(Engine):
    name = "piper"
    tasks = frozenset({"text-to-speech"})
    default_task = "text-to-speech"
    options = PiperOptions

    async def prepare_model(self, model, location: Path | None) -> dict[str, tuple[Path, Path]]:
        """Every voice of the model, by name: its ``.onnx`` and ``.onnx.json``."""
        voice_name = (await import_module("lllms_piper.voices")).voice_name
        own = await self._voice_files(model, model.url, location)
        voices = {voice_name(*own): own}
        for name, source in model.options.voices.items():
            voices[name] = await self._voice_files(model, source, await self.store.companion(model, **source_fields(source)))
        default = model.options.default_voice
        if default is not None and default not in voices:
            raise ModelLoadError(f"model {model.id!r}: default_voice {default!r} is not one of its voices ({', '.join(voices)})")
        return voices

    async def _voice_files(self, model, source: str | None, onnx: Path | None) -> tuple[Path, Path]:
        if onnx is not None and onnx.is_dir():
            found = sorted(onnx.glob("*.onnx"))
            if len(found) != 1:
                raise ModelLoadError(f"model {model.id!r}: the folder {onnx} must hold one .onnx voice, not {len(found)}")
            onnx = found[0]
        if onnx is None or onnx.suffix != ".onnx":
            raise ModelLoadError(f"model {model.id!r}: a Piper voice is an .onnx file, not {onnx}")
        config = onnx.with_name(onnx.name + ".json")
        if not config.exists() and source and source.startswith(("http://", "https://", "hf://")):
            config = await self.store.companion(model, url=source + ".json")  # downloaded beside the voice
        if not config.exists():
            raise ModelLoadError(f"model {model.id!r}: the voice {onnx} has no {config.name} beside it")
        return onnx, config

    async def create_instance(self, model, prepared, device: Device) -> PiperInstance:
        Speaker = (await import_module("lllms_piper.voices")).Speaker
        options: PiperOptions = model.options
        speaker = await trio.to_thread.run_sync(Speaker.load, prepared, options, device)
        return PiperInstance(slots=options.parallel, limiter=trio.CapacityLimiter(options.parallel), speaker=speaker)

    async def dispose_instance(self, instance: EngineInstance) -> None:
        instance.speaker = None

    async def text_to_speech(self, context, request, sink):
        speaker = context.instance.speaker
        voice, speaker_id = speaker.voice(request.voice_name)
        return await trio.to_thread.run_sync(
            speaker.speak, voice, speaker_id, request, sink, limiter=context.instance.limiter
        )


@hookimpl
def register_engines(register):
    register(PiperEngine)
