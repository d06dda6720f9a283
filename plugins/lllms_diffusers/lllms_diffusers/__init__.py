"""The ``diffusers`` engine: image generation and image edits with Hugging Face diffusers
pipelines (Stable Diffusion 1.x/2.x, SDXL, SD3, FLUX, PixArt, Sana... whatever
``DiffusionPipeline`` loads from a local pipeline directory).

A model is a diffusers pipeline directory (``model_index.json`` and its component
folders). Generation runs in a worker thread; after each denoising step the pipeline
reports its progress to the status and stops if the request was cancelled. Edits
(``/v1/images/edits``) run the same weights as an image-to-image pipeline, and with a
mask as an inpainting pipeline.

torch and diffusers are imported when a model is loaded, never when this module is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec
import trio
from msgspec import Meta

from lllms_core.plugin_api import Device, Engine, EngineInstance, ModelLoadError, hookimpl, import_module


class DiffusersOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Options of a ``diffusers`` model (flat in its table)."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights' dtype; ``auto``: float32 on the CPU, float16 on CUDA."""
    steps: Annotated[int, Meta(ge=1, le=1000)] | None = None
    """Denoising steps when a request names none; default: the pipeline's own."""
    guidance_scale: Annotated[float, Meta(ge=0, le=100)] | None = None
    """Classifier-free guidance when a request names none; default: the pipeline's own."""
    size: Annotated[str, Meta(pattern=r"^[1-9][0-9]{0,4}x[1-9][0-9]{0,4}$")] | None = None
    """``<width>x<height>`` when a request names none (or ``auto``); default: the model's native size."""
    strength: Annotated[float, Meta(gt=0, le=1)] = 0.8
    """Edits: how much of the input image is replaced when a request does not say."""
    max_pixels: Annotated[int, Meta(ge=64)] = 2048 * 2048
    """Largest image (width × height) a request may ask for."""
    trust_remote_code: bool = False
    """Let diffusers run Python code shipped with the pipeline."""


class DiffusersEngine(Engine):
    name = "diffusers"
    tasks = frozenset({"image-generation"})
    default_task = "image-generation"
    options = DiffusersOptions
    capabilities = frozenset({"seed", "image_edit", "mask", "negative_prompt"})

    async def prepare_model(self, model, location: Path | None):
        if location is None or not (Path(location) / "model_index.json").is_file():
            raise ModelLoadError(
                f"model {model.id!r}: the diffusers engine loads a pipeline directory (with model_index.json); "
                f"{location} is not one"
            )
        return Path(location)

    async def create_instance(self, model, prepared, device: Device) -> EngineInstance:
        Painter = (await import_module("lllms_diffusers.painting")).Painter
        painter = await trio.to_thread.run_sync(Painter.load, model, prepared, device)
        return PainterInstance(slots=1, limiter=trio.CapacityLimiter(1), painter=painter)

    async def dispose_instance(self, instance: EngineInstance) -> None:
        painter, instance.painter = instance.painter, None
        await trio.to_thread.run_sync(painter.close)

    async def image_generation(self, context, request):
        painter = context.instance.painter
        return await trio.to_thread.run_sync(painter.generate, context, request, limiter=context.instance.limiter)


class PainterInstance(EngineInstance):
    def info(self) -> dict:
        return self.painter.info() if self.painter is not None else {}


@hookimpl
def register_engines(register):
    register(DiffusersEngine)
