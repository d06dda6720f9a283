"""Images: CLIP-style embeddings of texts and images in one space, and image to text
(captioning, OCR) with BLIP, Florence-2, TrOCR (vision encoder-decoder) and the other
models ``AutoModelForImageTextToText`` loads.

The core has fetched and decoded every image (``context.image(source)`` gives it as a
Pillow image); everything here is blocking and runs in the instance's worker thread.
Image processors run on their Pillow backend when torchvision is not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import trio

from lllms_core.plugin_api import (
    EmbeddingRequest,
    EmbeddingResult,
    ImageToTextRequest,
    ImageToTextResult,
    InvalidRequestError,
    RequestImages,
    UnsupportedParameterError,
    is_image_data_url,
    normalize_embedding,
)

DEFAULT_PROMPTS = {"florence2": "<MORE_DETAILED_CAPTION>"}
"""The prompt of models that need one (a task token), when a request gives none."""
DEFAULT_MAX_TOKENS = 256


def image_backend() -> dict:
    """``backend="pil"`` for image processors when torchvision is missing (transformers would
    fall back to Pillow anyway, with a warning on every load)."""
    return {} if importlib.util.find_spec("torchvision") else {"backend": "pil"}


def is_dual_encoder(config) -> bool:
    """Whether a model's config is a text-and-image encoder pair (CLIP, SigLIP...)."""
    return getattr(config, "text_config", None) is not None and getattr(config, "vision_config", None) is not None


class ImageEmbedder:
    """A CLIP-style model: texts through its text tower, images through its vision tower,
    both projected into one space and scaled to unit length."""

    def __init__(self, model, tokenizer, image_processor, device):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.dimensions = model.config.projection_dim
        self.max_length = getattr(model.config.text_config, "max_position_embeddings", None)

    @classmethod
    def load(cls, model, prepared: Path, device, dtype) -> "ImageEmbedder":
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        from lllms_transformers.loading import load_pretrained

        remote = model.options.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(prepared, local_files_only=True, trust_remote_code=remote)
        image_processor = AutoImageProcessor.from_pretrained(prepared, local_files_only=True, trust_remote_code=remote, **image_backend())
        encoder = load_pretrained(AutoModel, prepared, model, device, dtype)
        return cls(encoder, tokenizer, image_processor, device)

    def info(self) -> dict:
        return {"device": str(self.device), "dimensions": self.dimensions, "inputs": ["text", "image"]}

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def embed(self, request: EmbeddingRequest, images: RequestImages) -> EmbeddingResult:
        if request.dimensions is not None and request.dimensions > self.dimensions:
            raise InvalidRequestError(f"dimensions must be at most {self.dimensions} for this model", param="dimensions")
        if request.pooling is not None:
            raise UnsupportedParameterError("a CLIP-style model pools as it was trained; `pooling` cannot change it", param="pooling")
        inputs = request.inputs
        vectors: dict[int, list[float]] = {}
        texts = [(index, item) for index, item in enumerate(inputs) if not is_image_data_url(item)]
        pictures = [(index, images[item].pixels) for index, item in enumerate(inputs) if is_image_data_url(item)]
        tokens = 0
        with torch.inference_mode():
            if texts:
                batch = self._tokenize([item for _, item in texts])
                tokens = int(batch["attention_mask"].sum())
                features = _features(self.model.get_text_features(**batch))
                vectors.update(zip((index for index, _ in texts), features.float().cpu().tolist()))
            if pictures:
                pixel_values = self.image_processor(images=[image for _, image in pictures], return_tensors="pt")["pixel_values"]
                features = _features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.model.dtype)))
                vectors.update(zip((index for index, _ in pictures), features.float().cpu().tolist()))
        return EmbeddingResult(
            embeddings=[normalize_embedding(vectors[index], request.dimensions) for index in range(len(inputs))],
            prompt_tokens=tokens,
        )

    def _tokenize(self, items: list) -> dict:
        truncate = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
        if all(isinstance(item, str) for item in items):
            batch = self.tokenizer(items, padding=True, return_tensors="pt", **truncate)
        else:
            ids = [self.tokenizer(item)["input_ids"] if isinstance(item, str) else list(item) for item in items]
            batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {name: batch[name].to(self.device) for name in ("input_ids", "attention_mask")}


def _features(output) -> torch.Tensor:
    """Projected features: transformers 5 returns them as the output's ``pooler_output``."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _Cancellation:
    """A stopping criterion that ends generation once the request is cancelled."""

    def __init__(self):
        self.cancelled: BaseException | None = None

    def __call__(self, input_ids, scores, **kwargs):
        try:
            trio.from_thread.check_cancelled()
        except trio.Cancelled as cancelled:
            self.cancelled = cancelled
        return torch.full((input_ids.shape[0],), self.cancelled is not None, dtype=torch.bool, device=input_ids.device)


class Captioner:
    """An image-to-text model: a caption, the text in the image (OCR), or an answer to a
    prompt about it, as the model was trained to give."""

    def __init__(self, model, processor, device, model_type: str, default_prompt: str | None):
        self.model = model
        self.processor = processor
        self.device = device
        self.model_type = model_type
        self.default_prompt = default_prompt
        self.takes_prompt = model_type != "vision-encoder-decoder"

    @classmethod
    def load(cls, model, prepared: Path, device, dtype) -> "Captioner":
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        from lllms_transformers.loading import load_pretrained

        remote = model.options.trust_remote_code
        config = AutoConfig.from_pretrained(prepared, local_files_only=True, trust_remote_code=remote)
        processor = AutoProcessor.from_pretrained(prepared, local_files_only=True, trust_remote_code=remote, **image_backend())
        captioner = load_pretrained(AutoModelForImageTextToText, prepared, model, device, dtype)
        prompt = model.options.caption_prompt or DEFAULT_PROMPTS.get(config.model_type)
        return cls(captioner, processor, device, config.model_type, prompt)

    def info(self) -> dict:
        return {"device": str(self.device), "model_type": self.model_type}

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def caption(self, image, prompt: str | None, max_tokens: int | None) -> tuple[str, int, str]:
        """(text, tokens generated, finish reason) for a Pillow image."""
        from transformers import StoppingCriteriaList

        prompt = prompt or self.default_prompt
        if prompt and not self.takes_prompt:
            raise UnsupportedParameterError(f"a {self.model_type} model reads images without a prompt", param="prompt")
        inputs = self.processor(images=image, text=prompt, return_tensors="pt") if prompt else self.processor(images=image, return_tensors="pt")
        inputs = {
            name: value.to(self.device, self.model.dtype) if value.is_floating_point() else value.to(self.device)
            for name, value in inputs.items()
            if isinstance(value, torch.Tensor)
        }
        limit = max_tokens or DEFAULT_MAX_TOKENS
        stop = _Cancellation()
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=limit, do_sample=False, stopping_criteria=StoppingCriteriaList([stop]))
        if stop.cancelled is not None:
            raise stop.cancelled
        generated = output[0].tolist()
        prompt_ids = inputs["input_ids"][0].tolist() if "input_ids" in inputs else []
        if prompt_ids and generated[: len(prompt_ids)] == prompt_ids:  # decoder-only models repeat the prompt
            generated = generated[len(prompt_ids) :]
        special = set(self.processor.tokenizer.all_special_ids)
        while generated and generated[0] in special:  # the decoder's start token
            generated = generated[1:]
        text = self.processor.batch_decode([generated], skip_special_tokens=True)[0].strip()
        if prompt and text.lower().startswith(prompt.lower().strip()):  # BLIP repeats it in its own tokens
            text = text[len(prompt.strip()) :].strip()
        return text, len(generated), "length" if len(generated) >= limit else "stop"

    def image_to_text(self, request: ImageToTextRequest, images: RequestImages) -> ImageToTextResult:
        text, _, _ = self.caption(images[request.image].pixels, request.prompt, request.max_tokens)
        return ImageToTextResult(text=text)


async def caption_chat(engine, context, request, sink):
    """A chat with a captioning model: the last message's (first) image, and its text as the
    prompt when there is one. The answer is one chunk; captioning decodes greedily."""
    from lllms_core.plugin_api import CompletionChunk, CompletionResult, ImageUrlPart, Usage, UserMessage, message_text

    for name, asked in (
        ("tools", bool(request.tools) and request.tool_choice != "none"),
        ("response_format", request.response_format is not None and type(request.response_format).__name__ != "ResponseFormatText"),
        ("logprobs", bool(request.logprobs or request.top_logprobs)),
        ("n", request.choices > 1),
        ("grammar", request.grammar is not None),
    ):
        if asked:
            raise engine.unsupported(name, f"{name!r} with an image-to-text model")
    last = request.messages[-1]
    parts = last.content if isinstance(last, UserMessage) and isinstance(last.content, list) else []
    image_parts = [part for part in parts if isinstance(part, ImageUrlPart)]
    if not image_parts:
        raise InvalidRequestError(
            f"model {context.model.id!r} reads images: the last message must be a user message with an image part",
            param="messages",
        )
    prompt = message_text(last).strip() or None
    captioner: Captioner = context.instance.loaded
    text, tokens, reason = await trio.to_thread.run_sync(
        captioner.caption, context.image(image_parts[0].image_url.url).pixels, prompt, request.token_limit,
        limiter=context.instance.limiter,
    )  # fmt: skip
    await sink.send(CompletionChunk(text=text))
    return CompletionResult(finish_reasons=[reason], usage=Usage(completion_tokens=tokens))


# --- vision-language chat models ---------------------------------------------------------


def is_vision_language(config) -> bool:
    """Whether a model's config is an image-text-to-text chat model (SmolVLM / Idefics3,
    Qwen2-VL, LLaVA, Gemma 3...) rather than a text-only causal language model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return getattr(config, "vision_config", None) is not None and config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def load_vision_language(model, prepared: Path, device, dtype):
    """A vision-language model, its processor and its tokenizer, as a TextGenerator."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lllms_transformers.generation import TextGenerator
    from lllms_transformers.loading import load_pretrained

    processor = AutoProcessor.from_pretrained(
        prepared, local_files_only=True, trust_remote_code=model.options.trust_remote_code, **image_backend()
    )
    chat = load_pretrained(AutoModelForImageTextToText, prepared, model, device, dtype)
    limit = getattr(chat.config.get_text_config(), "max_position_embeddings", None) or 2048
    context_size = min(model.context_size, limit) if model.context_size else limit
    return TextGenerator(chat, processor.tokenizer, device, context_size, processor=processor)


def image_urls(messages) -> list[str]:
    """The URLs of the messages' image parts, in the order the prompt shows them."""
    from types import SimpleNamespace

    from lllms_core.plugin_api import chat_image_sources

    return [url for url, _ in chat_image_sources(SimpleNamespace(messages=messages))]


def model_inputs(generator, text: str, images: list) -> tuple[list[int], dict]:
    """The prompt's tokens (each image expanded into its image tokens by the processor) and
    the image inputs the model's ``generate`` takes with them."""
    processed = generator.processor(text=text, images=images, add_special_tokens=False, return_tensors="pt")
    tokens = processed["input_ids"][0].tolist()
    dtype = generator.model.dtype
    extra = {
        name: value.to(generator.device, dtype) if value.is_floating_point() else value.to(generator.device)
        for name, value in processed.items()
        if name not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor)
    }
    return tokens, extra
