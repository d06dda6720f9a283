"""OpenAI's image routes: ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits``
(multipart/form-data), answered by image-generation models.

Images come back as ``b64_json`` (PNG by default; ``output_format`` picks JPEG or WebP),
encoded in a worker thread. lllms keeps no files, so ``response_format: url`` is refused.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import msgspec
import trio
from quart import Blueprint, Response, request

from lllms_core.api.common import json_response, read_request, state
from lllms_core.errors import InvalidRequestError, UnsupportedParameterError
from lllms_core.images import encode_image
from lllms_core.schemas import ImageGenerationRequest, ImageGenerationResult
from lllms_core.server import validation_error

images_api = Blueprint("images", __name__)

EDIT_FIELDS = frozenset(ImageGenerationRequest.__struct_fields__) - {"image", "mask"}
"""Form fields of an edit besides the uploaded files."""


async def images_body(generation: ImageGenerationRequest, result: ImageGenerationResult) -> dict[str, Any]:
    output_format = generation.output_format or "png"
    data = []
    for pixels in result.images:
        encoded = await trio.to_thread.run_sync(encode_image, pixels, output_format)
        data.append({"b64_json": base64.b64encode(encoded).decode("ascii")})
    # no `size`: OpenAI's schema allows only its own sizes there
    return {"created": int(time.time()), "data": data, "output_format": output_format}


async def generate(generation: ImageGenerationRequest) -> Response:
    if generation.response_format == "url":
        raise UnsupportedParameterError(
            "lllms keeps no image files to link to: use response_format b64_json", param="response_format"
        )
    if not generation.prompt.strip():
        raise InvalidRequestError("`prompt` must not be empty", param="prompt")
    result = await state().server.image_generation(generation)
    return json_response(await images_body(generation, result))


@images_api.post("/images/generations")
async def generations() -> Response:
    generation = await read_request(ImageGenerationRequest)
    if generation.image or generation.mask is not None:
        raise InvalidRequestError("images to edit go to /v1/images/edits, as multipart/form-data", param="image")
    return await generate(generation)


@images_api.post("/images/edits")
async def edits() -> Response:
    form = await request.form
    files = await request.files
    uploads = files.getlist("image") + files.getlist("image[]")
    if not uploads:
        raise InvalidRequestError("`image` is required: the image to edit, sent as multipart/form-data", param="image")
    mask = files.get("mask")
    fields = {name: value for name, value in form.items() if name in EDIT_FIELDS}
    try:
        generation = msgspec.convert(
            {**fields, "image": [upload.read() for upload in uploads], "mask": mask.read() if mask else None},
            ImageGenerationRequest,
            strict=False,
        )
    except msgspec.ValidationError as error:
        raise validation_error(error) from None
    return await generate(generation)
