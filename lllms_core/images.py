"""Images in requests: data URLs and http(s) URLs, fetched with limits and decoded
off the trio thread, once per request, before the request takes a slot.

Engines never fetch or decode: the core resolves every image a request carries
(chat ``image_url`` parts, image inputs of embeddings, the images of an image
edit) into :class:`Image` objects and hands them over in the task context
(``context.image(source)``). A bad image is a 400 in the API's error shape
before any instance is busy.

Other APIs (Anthropic image blocks, Responses ``input_image``) turn their image
blocks into chat parts with :func:`image_part`; the core resolves those as any other.

Pillow is imported only when an image is decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from typing import TYPE_CHECKING, Any, Iterable, Iterator
from urllib.parse import unquote_to_bytes, urlsplit

import trio

from lllms_core.errors import InvalidRequestError
from lllms_core.schemas import ImageUrl, ImageUrlPart

if TYPE_CHECKING:
    import PIL.Image

    from lllms_core.config import ImagesConfig
    from lllms_core.schemas import ChatCompletionRequest

MEDIA_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
}
"""The formats an image may have (names as in ``images.formats``), and their media types."""

FETCHED_TYPES = frozenset({"application/octet-stream", "binary/octet-stream", ""})
"""Content types of a fetched image that are not ``image/*`` but are read anyway (servers
that do not know better); the bytes decide."""

MAX_REDIRECTS = 5


class ImageError(InvalidRequestError):
    """An image in a request cannot be used: 400, ``code`` says why."""

    code = "invalid_image"


class Image:
    """A decoded image: ``pixels`` (a Pillow image in RGB), its size, its format and a
    digest of its encoded bytes (same bytes, same digest)."""

    def __init__(self, pixels: "PIL.Image.Image", format: str, data: bytes, alpha: "PIL.Image.Image | None" = None):
        self.pixels = pixels
        self.width, self.height = pixels.size
        self.format = format
        self.data = data
        """The encoded bytes, as received."""
        self.digest = hashlib.sha256(data).hexdigest()
        self.alpha = alpha
        """The transparency (mode L, 0 transparent) of an image that has one, else None:
        an edit's mask marks with it where to paint."""

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    def __repr__(self) -> str:
        return f"Image({self.format}, {self.width}x{self.height}, {self.digest[:12]})"


# --- sources ----------------------------------------------------------------------


def is_image_data_url(text: Any) -> bool:
    """Whether ``text`` is a data URL of an image (how an image is given as an embedding input)."""
    return isinstance(text, str) and text[:11].lower() == "data:image/"


class PlacedImageUrlPart(ImageUrlPart, tag_field="type", tag="image_url", kw_only=True):
    """An image part that knows where its API's request had it, for the ``param`` of an error."""

    param: str | None = None


def image_part(
    url: str | None = None, *, data: bytes | str | None = None, media_type: str | None = None, param: str | None = None
) -> ImageUrlPart:
    """A chat ``image_url`` part from a URL, or from image bytes (or their base64) and their
    media type: what adapters of other APIs build from their image blocks. ``param``: where
    the image is in that API's request, named by an error about it."""
    if url is None:
        if data is None or media_type is None:
            raise ValueError("an image needs a url, or data and its media_type")
        encoded = data if isinstance(data, str) else base64.b64encode(data).decode("ascii")
        url = f"data:{media_type};base64,{encoded}"
    return PlacedImageUrlPart(image_url=ImageUrl(url=url), param=param)


def parse_data_url(url: str, param: str | None) -> tuple[str, bytes]:
    """(media type, bytes) of a ``data:`` URL."""
    head, comma, payload = url.partition(",")
    if not comma:
        raise ImageError("the image's data URL has no data (expected data:<type>;base64,<data>)", param=param)
    attributes = head[5:].split(";")
    media_type = attributes[0].strip().lower()
    try:
        if "base64" in (attribute.strip().lower() for attribute in attributes[1:]):
            data = base64.b64decode(payload, validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise ImageError("the image's data URL is not valid base64", param=param) from None
    return media_type, data


def chat_image_sources(request: "ChatCompletionRequest") -> list[tuple[str, str]]:
    """(url, param) of every image part of a chat request's messages, in order."""
    found = []
    for number, message in enumerate(request.messages):
        content = message.content
        if isinstance(content, list):
            for index, part in enumerate(content):
                if isinstance(part, ImageUrlPart):
                    where = getattr(part, "param", None) or f"messages[{number}].content[{index}].image_url.url"
                    found.append((part.image_url.url, where))
    return found


# --- fetching and decoding --------------------------------------------------------------


def check_size(size: int, config: "ImagesConfig", param: str | None) -> None:
    if size > config.max_bytes:
        raise ImageError(
            f"the image is larger than the limit of {config.max_bytes} bytes", param=param, code="image_too_large"
        )


async def fetch_image(url: str, config: "ImagesConfig", param: str | None) -> bytes:
    """The bytes at an http(s) URL, within ``config``'s time and size limits."""
    import httpx

    if not config.fetch_urls:
        raise ImageError(
            "this server does not fetch image URLs; send the image as a data URL", param=param, code="image_url_refused"
        )
    received = bytearray()
    try:
        with trio.fail_after(config.fetch_timeout):
            async with httpx.AsyncClient(follow_redirects=True, max_redirects=MAX_REDIRECTS, timeout=None) as client:
                async with client.stream("GET", url, headers={"Accept": "image/*"}) as response:
                    if response.status_code != 200:
                        raise ImageError(
                            f"fetching the image failed: {url} answered {response.status_code}",
                            param=param, code="image_fetch_failed",
                        )  # fmt: skip
                    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if not media_type.startswith("image/") and media_type not in FETCHED_TYPES:
                        raise ImageError(
                            f"{url} is not an image (its content type is {media_type})",
                            param=param, code="unsupported_image_type",
                        )  # fmt: skip
                    length = response.headers.get("content-length")
                    if length and length.isdigit():
                        check_size(int(length), config, param)
                    async for piece in response.aiter_bytes():
                        received += piece
                        check_size(len(received), config, param)
    except trio.TooSlowError:
        raise ImageError(
            f"fetching the image took longer than {config.fetch_timeout} s: {url}", param=param, code="image_fetch_timeout"
        ) from None
    except httpx.HTTPError as error:
        raise ImageError(
            f"fetching the image failed: {type(error).__name__}: {error}", param=param, code="image_fetch_failed"
        ) from None
    return bytes(received)


def decode_image(data: bytes, config: "ImagesConfig", param: str | None) -> Image:
    """Decode image bytes to RGB (blocking: run it in a worker thread). Transparent
    pixels become white, EXIF orientation is applied, an animation gives its first frame."""
    import PIL.Image
    import PIL.ImageOps

    check_size(len(data), config, param)
    try:
        with PIL.Image.open(io.BytesIO(data)) as opened:
            kind = (opened.format or "").lower()
            if kind not in config.formats:
                allowed = ", ".join(config.formats)
                raise ImageError(
                    f"images of type {kind or 'unknown'} are not accepted (accepted: {allowed})",
                    param=param, code="unsupported_image_type",
                )  # fmt: skip
            width, height = opened.size
            if width * height > config.max_pixels:
                raise ImageError(
                    f"the image has {width}x{height} pixels, more than the limit of {config.max_pixels}",
                    param=param, code="image_too_large",
                )  # fmt: skip
            opened.seek(0)
            pixels = PIL.ImageOps.exif_transpose(opened)
            alpha = None
            if pixels.mode in ("RGBA", "LA", "PA") or (pixels.mode == "P" and "transparency" in pixels.info):
                rgba = pixels.convert("RGBA")
                alpha = rgba.getchannel("A")
                white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                pixels = PIL.Image.alpha_composite(white, rgba)
            pixels = pixels.convert("RGB")
            pixels.load()
    except PIL.Image.DecompressionBombError as error:
        raise ImageError(f"the image is too large to decode: {error}", param=param, code="image_too_large") from None
    except PIL.UnidentifiedImageError:
        raise ImageError("the data is not an image (or not one of a known type)", param=param) from None
    except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt
        raise ImageError(f"the image cannot be decoded: {error}", param=param) from None
    return Image(pixels, kind, data, alpha)


def decode_data_url(url: str, config: "ImagesConfig", param: str | None) -> Image:
    """Decode the image of a ``data:`` URL (blocking: base64 and pixels)."""
    media_type, data = parse_data_url(url, param)
    if media_type and not media_type.startswith("image/"):
        raise ImageError(f"a data URL of type {media_type} is not an image", param=param, code="unsupported_image_type")
    return decode_image(data, config, param)


async def load_image(source: str | bytes, config: "ImagesConfig", param: str | None = None) -> Image:
    """An image from bytes, a data URL or an http(s) URL, checked against ``config``; the
    decoding runs in a worker thread."""
    if isinstance(source, (bytes, bytearray)):
        return await trio.to_thread.run_sync(decode_image, bytes(source), config, param)
    if source[:5].lower() == "data:":
        return await trio.to_thread.run_sync(decode_data_url, source, config, param)
    if urlsplit(source).scheme.lower() in ("http", "https"):
        data = await fetch_image(source, config, param)
        return await trio.to_thread.run_sync(decode_image, data, config, param)
    raise ImageError("an image must be an http(s) URL or a data URL", param=param)


class RequestImages:
    """The decoded images of one request, by their source (URL, data URL or bytes)."""

    def __init__(self, images: dict[Any, Image] | None = None):
        self._images = images or {}

    def __getitem__(self, source: str | bytes) -> Image:
        try:
            return self._images[source]
        except KeyError:
            raise KeyError("this image was not resolved by the core (see lllms_core.images.load_images)") from None

    def __contains__(self, source: object) -> bool:
        return source in self._images

    def __iter__(self) -> Iterator[Image]:
        return iter(self._images.values())

    def __len__(self) -> int:
        return len(self._images)


async def load_images(sources: Iterable[tuple[str | bytes, str | None]], config: "ImagesConfig") -> RequestImages:
    """Fetch and decode (source, param) pairs concurrently, each distinct source once.
    The first bad image's error is raised; the others are cancelled."""
    wanted: dict[Any, str | None] = {}
    for source, param in sources:
        wanted.setdefault(source, param)
    if len(wanted) > config.max_per_request:
        raise ImageError(
            f"a request may carry at most {config.max_per_request} images; this one has {len(wanted)}",
            code="too_many_images",
        )
    loaded: dict[Any, Image] = {}

    async def one(source, param) -> None:
        loaded[source] = await load_image(source, config, param)

    try:
        async with trio.open_nursery() as nursery:
            for source, param in wanted.items():
                nursery.start_soon(one, source, param)
    except BaseExceptionGroup as group:
        # report one image's error (the first), as a plain 400
        errors = group.subgroup(lambda error: isinstance(error, ImageError))
        if errors is not None:
            raise _first(errors) from None
        raise
    return RequestImages(loaded)


def _first(group: BaseExceptionGroup) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def encode_image(pixels: "PIL.Image.Image", format: str = "png") -> bytes:
    """An image as PNG, JPEG or WebP bytes (blocking: run it in a worker thread)."""
    buffer = io.BytesIO()
    image = pixels.convert("RGB") if format == "jpeg" and pixels.mode != "RGB" else pixels
    image.save(buffer, format={"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[format])
    return buffer.getvalue()


async def describe_images(request: "ChatCompletionRequest", caption) -> "ChatCompletionRequest":
    """The request with each image part replaced by a text part ``[Image: <caption>]``: how a
    composed engine (image → caption → chat) tells a chat model that sees no images what they
    show. ``caption(url)`` is awaited once per distinct image URL (a composed engine asks its
    captioning model, with ``context.image(url)``'s bytes)."""
    import msgspec

    from lllms_core.schemas import TextPart

    captions: dict[str, str] = {}
    for url, _ in chat_image_sources(request):
        if url not in captions:
            captions[url] = await caption(url)
    if not captions:
        return request
    messages = []
    for message in request.messages:
        if isinstance(message.content, list) and any(isinstance(part, ImageUrlPart) for part in message.content):
            parts = [
                TextPart(text=f"[Image: {captions[part.image_url.url]}]") if isinstance(part, ImageUrlPart) else part
                for part in message.content
            ]
            message = msgspec.structs.replace(message, content=parts)
        messages.append(message)
    return msgspec.structs.replace(request, messages=messages)
