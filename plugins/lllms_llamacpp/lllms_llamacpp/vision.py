"""Images in llama.cpp chats: a multimodal projector (``mmproj`` GGUF) through llama.cpp's
mtmd library (llama_cpp.mtmd_cpp).

An image becomes *media*: the projector's chunks for it (the image's embeddings and any
text tokens the model wraps images in). In a prompt, an image's embeddings stand as
``n_pos`` placeholder tokens: negative ids derived from the image's digest, so token
prefixes compare images by content (the same image in a follow-up turn keeps its cached
evaluation; another image does not match) and positions stay those llama.cpp uses. The
scheduler evaluates an image's chunk with mtmd when a prompt's evaluation reaches it.

Like :mod:`lllms_llamacpp.native`, this module imports llama_cpp at its top.
"""

from __future__ import annotations

import ctypes
import logging
import secrets
import threading

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

from lllms_core.plugin_api import EngineError, InvalidRequestError, ModelLoadError
from lllms_llamacpp.native import Context, Model, _log_callback, native_error_reason

log = logging.getLogger("lllms.llamacpp")

PLACEHOLDER_SPACE = 1 << 30


class ImageChunks:
    """The chunks mtmd made of one image; freed once every job using them ended (the
    scheduler thread releases them)."""

    def __init__(self, chunks):
        self._chunks = chunks
        self.users = 1
        """The request that made them holds them until it ends; so does each of its jobs."""
        self._lock = threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self.users += 1

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users > 0 or self._chunks is None:
                return
            chunks, self._chunks = self._chunks, None
        mtmd.mtmd_input_chunks_free(chunks)


class Media:
    """An image's chunk of embeddings in a prompt, and its placeholder tokens."""

    def __init__(self, owner: ImageChunks, chunk, n_pos: int, placeholders: list[int]):
        self.owner = owner
        self.chunk = chunk
        self.n_pos = n_pos
        self.placeholders = placeholders


class Projector:
    """A loaded multimodal projector for one text model."""

    def __init__(self, model: Model, path: str, *, threads: int, gpu: bool):
        mtmd.mtmd_helper_log_set(_log_callback, ctypes.c_void_p(0))
        mtmd.mtmd_log_set(_log_callback, ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = gpu
        params.n_threads = threads
        params.print_timings = False
        self.pointer, reason = native_error_reason(mtmd.mtmd_init_from_file, path.encode(), model.pointer, params)
        if not self.pointer:
            raise ModelLoadError(
                f"llama.cpp could not load the multimodal projector {path!r} for {model.path!r}: {reason or 'see its log'}"
            )
        self.path = path
        self.vision = bool(mtmd.mtmd_support_vision(self.pointer))
        self.model = model

    def close(self) -> None:
        if self.pointer:
            mtmd.mtmd_free(self.pointer)
            self.pointer = None

    def image(self, pixels, digest: str) -> tuple[list[int], list[Media]]:
        """An RGB Pillow image as prompt tokens (its wrapper text tokens and placeholders)
        and the media standing behind the placeholders."""
        if not self.vision:
            raise InvalidRequestError("this model's projector does not take images", param="messages")
        rgb = np.asarray(pixels.convert("RGB"), dtype=np.uint8)
        height, width = rgb.shape[:2]
        buffer = (ctypes.c_uint8 * rgb.size).from_buffer_copy(rgb.tobytes())
        bitmap = mtmd.mtmd_bitmap_init(width, height, buffer)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            mtmd.mtmd_bitmap_set_id(bitmap, digest.encode())
            part = mtmd.mtmd_input_part(text=None, bitmap=bitmap)
            parts = (ctypes.POINTER(mtmd.mtmd_input_part) * 1)(ctypes.pointer(part))
            status = mtmd.mtmd_tokenize_from_parts(self.pointer, chunks, parts, 1, False)
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd.mtmd_input_chunks_free(chunks)
            raise InvalidRequestError(f"the model's projector cannot take this image (mtmd status {status})", param="messages")
        owner = ImageChunks(chunks)
        tokens: list[int] = []
        media: list[Media] = []
        seed = int(digest[:15], 16)
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t(0)
                pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                tokens += [pointer[i] for i in range(count.value)]
                continue
            n_pos = mtmd.mtmd_input_chunk_get_n_pos(chunk)
            start = seed + 7919 * len(media)
            placeholders = [-1 - (start + offset) % PLACEHOLDER_SPACE for offset in range(n_pos)]
            media.append(Media(owner, chunk, n_pos, placeholders))
            tokens += placeholders
        return tokens, media


def evaluate(projector: Projector, context: Context, media: Media, position: int, seq: int) -> None:
    """Evaluate an image's chunk into a sequence at ``position`` (scheduler thread)."""
    new_position = llama_cpp.llama_pos(0)
    status = mtmd.mtmd_helper_eval_chunk_single(
        projector.pointer, context.pointer, media.chunk, position, seq, context.n_batch, False, ctypes.byref(new_position)
    )
    if status != 0:
        raise EngineError(f"llama.cpp could not evaluate an image (mtmd status {status})")


def media_positions(prompt: list[int], media: list[Media]) -> dict[int, Media]:
    """Where in ``prompt`` each media's placeholders start."""
    firsts = {item.placeholders[0]: item for item in media}
    return {position: firsts[token] for position, token in enumerate(prompt) if token < 0 and token in firsts}


class PromptImages:
    """A chat request's images for one prompt: each image's tokens and media, in message
    order, and the marker that stands for an image in the rendered template."""

    def __init__(self, instance, images: list[tuple[list[int], list[Media]]]):
        self.instance = instance
        self.images = images
        self.marker = f"<__image_{secrets.token_hex(6)}__>"

    def tokens_for(self, text: str) -> list[list[int]]:
        """The tokens of the images whose markers ``text`` holds, in order. Turns dropped to
        fit the context took their images with them: the markers left are the last images'."""
        left = text.count(self.marker)
        return [tokens for tokens, _ in self.images[len(self.images) - left :]] if left else []

    def positions(self, prompt: list[int]) -> dict[int, Media]:
        return media_positions(prompt, [media for _, items in self.images for media in items])

    def release(self) -> None:
        for owner in {id(m.owner): m.owner for _, items in self.images for m in items}.values():
            owner.release()


async def prompt_images(instance, context, request) -> PromptImages | None:
    """The images of a chat request, made into the projector's chunks in a worker thread;
    None without images."""
    import trio

    from lllms_core.plugin_api import UnsupportedParameterError
    from lllms_core.plugin_api import chat_image_sources

    sources = [url for url, _ in chat_image_sources(request)]
    if not sources:
        return None
    projector: Projector | None = instance.projector
    if projector is None:
        raise UnsupportedParameterError(
            f"model {context.model.id!r} cannot see images: configure its multimodal projector (mmproj)", param="messages"
        )
    made: list[tuple[list[int], list[Media]]] = []

    def make() -> None:
        for source in sources:
            image = context.image(source)
            made.append(projector.image(image.pixels, image.digest))

    try:
        await trio.to_thread.run_sync(make, limiter=instance.limiter)
    except BaseException:
        PromptImages(instance, made).release()
        raise
    return PromptImages(instance, made)
