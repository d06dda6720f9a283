"""Running a diffusers pipeline: generations, edits (image to image) and inpainting.

Everything here is blocking and runs in the instance's worker thread. The pipeline's
``callback_on_step_end`` reports each step to the slot's progress and checks for
cancellation, so a cancelled request stops between two steps. Image ``i`` of a request
is generated with its own ``torch.Generator`` seeded ``seed + i``: the same request gives
the same images, whatever ``n``.
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
from pathlib import Path
from typing import Any

import torch
import trio

from lllms_core.plugin_api import (
    Device,
    ImageGenerationRequest,
    ImageGenerationResult,
    InvalidRequestError,
    ModelLoadError,
    UnsupportedParameterError,
)

log = logging.getLogger("lllms.diffusers")


class Painter:
    """A loaded pipeline, and the image-to-image and inpainting pipelines sharing its weights."""

    def __init__(self, model, pipeline, device: torch.device):
        self.model = model
        self.options = model.options
        self.pipeline = pipeline
        self.device = device
        self._derived: dict[str, Any] = {}
        self.native_size = self._native_size()

    @classmethod
    def load(cls, model, path: Path, device: Device) -> "Painter":
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        if device.cpu_threads:
            torch.set_num_threads(device.cpu_threads)  # process-wide, as torch does it
        target = torch.device("cuda") if device.gpu and torch.cuda.is_available() else torch.device("cpu")
        if device.gpu and target.type == "cpu" and model.device.gpu != "auto":
            raise ModelLoadError(f"model {model.id!r} must run on the GPU, but torch sees no CUDA device")
        dtype = model.options.dtype
        torch_dtype = (torch.float32 if target.type == "cpu" else torch.float16) if dtype == "auto" else getattr(torch, dtype)
        try:
            pipeline = DiffusionPipeline.from_pretrained(
                path, dtype=torch_dtype, local_files_only=True, trust_remote_code=model.options.trust_remote_code
            )
        except (OSError, ValueError, RuntimeError, TypeError) as error:
            raise ModelLoadError(f"model {model.id!r} failed to load from {path}: {type(error).__name__}: {error}") from error
        pipeline = pipeline.to(target)
        pipeline.set_progress_bar_config(disable=True)
        return cls(model, pipeline, target)

    def info(self) -> dict[str, Any]:
        width, height = self.native_size
        return {"device": str(self.device), "pipeline": type(self.pipeline).__name__, "native_size": f"{width}x{height}"}

    def close(self) -> None:
        self.pipeline = None
        self._derived.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _native_size(self) -> tuple[int, int]:
        pipeline = self.pipeline
        if self.options.size:
            width, _, height = self.options.size.partition("x")
            return int(width), int(height)
        sample = getattr(pipeline, "default_sample_size", None)
        if sample is None:
            denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
            sample = getattr(getattr(denoiser, "config", None), "sample_size", None) or 64
        if isinstance(sample, (list, tuple)):
            sample = sample[0]
        side = int(sample) * int(getattr(pipeline, "vae_scale_factor", 8))
        return side, side

    def _for(self, kind: str):
        """The pipeline for ``text`` (the loaded one), ``image`` (image to image) or ``inpaint``."""
        if kind == "text":
            return self.pipeline
        if kind not in self._derived:
            from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

            auto = AutoPipelineForImage2Image if kind == "image" else AutoPipelineForInpainting
            try:
                derived = auto.from_pipe(self.pipeline)
            except (ValueError, KeyError) as error:
                what = "image edits" if kind == "image" else "masked edits"
                raise UnsupportedParameterError(
                    f"model {self.model.id!r} ({type(self.pipeline).__name__}) cannot do {what}: {error}",
                    param="mask" if kind == "inpaint" else "image",
                ) from None
            derived.set_progress_bar_config(disable=True)
            self._derived[kind] = derived
        return self._derived[kind]

    def generate(self, context, request: ImageGenerationRequest) -> ImageGenerationResult:
        width, height = request.dimensions or self.native_size
        if width * height > self.options.max_pixels:
            raise InvalidRequestError(
                f"{width}x{height} is larger than this model allows ({self.options.max_pixels} pixels)", param="size"
            )
        kind = "inpaint" if request.mask is not None else "image" if request.image else "text"
        pipeline = self._for(kind)
        accepted = inspect.signature(pipeline.__call__).parameters
        arguments: dict[str, Any] = {"prompt": request.prompt, "width": width, "height": height, "output_type": "pil"}
        if request.negative_prompt:
            if "negative_prompt" not in accepted:
                raise UnsupportedParameterError(
                    f"model {self.model.id!r} ({type(pipeline).__name__}) takes no negative prompt", param="negative_prompt"
                )
            arguments["negative_prompt"] = request.negative_prompt
        steps = request.steps or self.options.steps
        if steps is not None:
            arguments["num_inference_steps"] = steps
        guidance = request.guidance_scale if request.guidance_scale is not None else self.options.guidance_scale
        if guidance is not None and "guidance_scale" in accepted:
            arguments["guidance_scale"] = guidance
        if kind != "text":
            strength = request.strength if request.strength is not None else self.options.strength
            arguments["image"] = context.image(request.image[0]).pixels.resize((width, height))
            arguments["strength"] = strength
            # an edit denoises steps × strength steps: at least one
            default = accepted["num_inference_steps"].default if "num_inference_steps" in accepted else None
            planned = arguments.get("num_inference_steps", default)
            if isinstance(planned, int) and int(planned * strength) < 1:
                arguments["num_inference_steps"] = math.ceil(1 / strength)
        if kind == "inpaint":
            arguments["mask_image"] = self._mask(context.image(request.mask), width, height)
        seed = request.seed if request.seed is not None else secrets.randbits(31)
        images = []
        for number in range(request.count):
            generator = torch.Generator(device="cpu").manual_seed(seed + number)
            on_step = _StepReporter(context.progress, number, request.count)
            try:
                with torch.inference_mode():
                    output = pipeline(**arguments, generator=generator, callback_on_step_end=on_step)
            except ValueError as error:
                if on_step.steps_done or number:
                    raise
                # raised by the pipeline's own input checks, before any step (sizes it cannot make...)
                raise InvalidRequestError(f"model {self.model.id!r} cannot make this image: {error}") from None
            images.append(output.images[0])
        return ImageGenerationResult(images=images, seed=seed)

    @staticmethod
    def _mask(mask, width: int, height: int):
        """OpenAI's mask (transparent where to paint) as diffusers wants it (white where to paint)."""
        import PIL.ImageOps

        if mask.alpha is None:
            raise InvalidRequestError("the mask must have transparency: transparent pixels mark where to paint", param="mask")
        return PIL.ImageOps.invert(mask.alpha).convert("RGB").resize((width, height))


class _StepReporter:
    """``callback_on_step_end``: progress over all images of the request, and cancellation."""

    def __init__(self, progress, number: int, count: int):
        self.progress = progress
        self.number = number
        self.count = count
        self.steps_done = 0

    def __call__(self, pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
        self.steps_done = step + 1
        steps = getattr(pipeline, "num_timesteps", None) or self.steps_done
        self.progress.update(self.number * steps + self.steps_done, self.count * steps)
        trio.from_thread.check_cancelled()  # raises trio.Cancelled: the pipeline stops here
        return callback_kwargs
