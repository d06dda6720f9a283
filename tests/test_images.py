"""Images in requests (the core's fetching, decoding and limits) and the image routes,
through the `openai` client against a real server with the fake engine.

The fake engine answers a chat with the size and type of each image it was given, and
"generates" plain images of one colour, so these tests see exactly what the core handed
over. Image URLs are served by a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import base64
import io
import random
import time

import httpx
import msgspec
import openai
import pytest
import trio
from PIL import Image

from helpers.fileserver import FileServer
from helpers.openai_schema import validate

pytestmark = pytest.mark.timeout(60)

LIMITS = {"max_bytes": 300_000, "max_pixels": 1_000_000, "fetch_timeout": 1.0, "max_per_request": 3}


def png(width: int = 64, height: int = 48, colour=(200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(data: bytes, kind: str = "PIL") -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, format=kind)
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def ask(client, url: str, model: str = "see", text: str = "What is this?"):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}],
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    with FileServer(tmp_path_factory.mktemp("images")) as server:
        yield server


@pytest.fixture(scope="module")
def slow_files(tmp_path_factory):
    with FileServer(tmp_path_factory.mktemp("slow-images")) as server:
        server.rate = 20_000  # bytes per second: a 67 kB image takes 3 s
        yield server


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory(
        {
            "images": LIMITS,
            "models": {
                "see": {"engine": "fake"},
                "embed": {"engine": "fake", "task": "embedding"},
                "painter": {"engine": "fake", "task": "image-generation", "token_delay": 0.01},
                "slow-painter": {"engine": "fake", "task": "image-generation", "token_delay": 0.2},
            },
        }
    )


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=30)


def nothing_busy(server) -> bool:
    status = httpx.get(server.url("/")).json()
    slots = [slot for instance in status["instances"] for slot in instance["slots"]]
    return status["processing"] == 0 and status["queued"] == 0 and not any(slot["busy"] for slot in slots)


def refused(call, code: str, param: str | None = None) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.body["code"] == code, caught.value.body
    if param is not None:
        assert caught.value.body["param"] == param
    return caught.value


# --- images in chat -------------------------------------------------------------------


def test_a_data_url_image_reaches_the_engine_decoded(client):
    answer = ask(client, data_url(png(64, 48)))
    assert answer.choices[0].message.content == "You said: What is this? [image 64x48 png]"


def test_jpeg_webp_and_gif_images_are_decoded(client):
    for kind, media_type in (("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")):
        answer = ask(client, data_url(encoded(png(20, 10), kind), media_type))
        assert answer.choices[0].message.content.endswith(f"[image 20x10 {kind.lower()}]")


def test_an_http_image_url_is_fetched(client, files):
    url = files.add("/photo.png", png(30, 40))
    answer = ask(client, url)
    assert answer.choices[0].message.content.endswith("[image 30x40 png]")
    assert len(files.gets("/photo.png")) == 1


def test_the_same_image_twice_in_a_request_is_fetched_once(client, files):
    url = files.add("/twice.png", png(8, 8))
    answer = client.chat.completions.create(
        model="see",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}] * 2}],
    )
    assert answer.choices[0].message.content.count("[image 8x8 png]") == 2
    assert len(files.gets("/twice.png")) == 1


def test_something_that_is_not_an_image_is_a_bad_request(client, server):
    refused(lambda: ask(client, data_url(b"these are words, not pixels")), "invalid_image", "messages[0].content[1].image_url.url")
    refused(lambda: ask(client, data_url(png()[:60])), "invalid_image")  # cut short
    refused(lambda: ask(client, "data:image/png;base64,@@@"), "invalid_image")
    refused(lambda: ask(client, "ftp://example.com/cat.png"), "invalid_image")
    assert nothing_busy(server)


def test_a_streamed_chat_with_a_bad_image_is_a_bad_request_before_the_stream_starts(client, server):
    def stream():
        return list(client.chat.completions.create(model="see", stream=True, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(b"nope")}}]}]))  # fmt: skip

    refused(stream, "invalid_image")
    assert nothing_busy(server)


def test_an_image_type_that_is_not_accepted_is_a_bad_request(client, files, server):
    refused(lambda: ask(client, data_url(encoded(png(), "TIFF"), "image/tiff")), "unsupported_image_type")
    refused(lambda: ask(client, data_url(b"<html></html>", "text/html")), "unsupported_image_type")
    page = files.add("/page.html", b"<html><body>no image here</body></html>")
    refused(lambda: ask(client, page), "invalid_image")  # served without a content type: the bytes decide
    assert nothing_busy(server)


def test_an_image_too_large_is_a_bad_request(client, files, server):
    big = png_of(Image.frombytes("RGB", (400, 400), random.Random(0).randbytes(400 * 400 * 3)))  # noise does not compress
    assert len(big) > LIMITS["max_bytes"]
    refused(lambda: ask(client, data_url(big)), "image_too_large")
    refused(lambda: ask(client, files.add("/big.png", big)), "image_too_large")
    refused(lambda: ask(client, data_url(png(2000, 1000))), "image_too_large")  # small file, too many pixels
    assert nothing_busy(server)


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_url_that_does_not_answer_in_time_is_a_bad_request(client, slow_files, server):
    url = slow_files.add("/slow.png", png_of(Image.frombytes("RGB", (150, 150), random.Random(1).randbytes(150 * 150 * 3))))
    started = time.monotonic()
    error = refused(lambda: ask(client, url), "image_fetch_timeout")
    assert time.monotonic() - started < 5
    assert "1.0 s" in error.message
    assert nothing_busy(server)


def test_an_image_url_that_fails_is_a_bad_request(client, files, server):
    refused(lambda: ask(client, files.url("/missing.png")), "image_fetch_failed")
    assert nothing_busy(server)


def test_too_many_images_in_one_request_is_a_bad_request(client):
    parts = [{"type": "image_url", "image_url": {"url": data_url(png(4, 4, (i, i, i)))}} for i in range(4)]
    refused(lambda: client.chat.completions.create(model="see", messages=[{"role": "user", "content": parts}]), "too_many_images")


def test_a_transparent_image_is_flattened_onto_white():
    from lllms_core.config import ImagesConfig
    from lllms_core.images import load_image

    image = trio.run(load_image, data_url(png(4, 4, (0, 0, 0, 0), mode="RGBA")), ImagesConfig())
    assert image.pixels.mode == "RGB" and image.pixels.getpixel((0, 0)) == (255, 255, 255)


def test_a_server_that_does_not_fetch_urls_says_so(server_for_test, files):
    server = server_for_test({"images": {"fetch_urls": False}, "models": {"see": {"engine": "fake"}}})
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0)
    refused(lambda: ask(client, files.add("/refused.png", png())), "image_url_refused")
    assert ask(client, data_url(png(3, 3))).choices[0].message.content.endswith("[image 3x3 png]")
    assert not files.gets("/refused.png")


def test_a_model_whose_engine_does_not_take_images_refuses_them(client):
    refused(lambda: client.embeddings.create(model="embed", input=["text", data_url(png())]), "unsupported_parameter", "input")


# --- images through the other APIs ----------------------------------------------------


def test_anthropic_image_blocks_reach_the_model(server, files):
    import anthropic

    client = anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0)
    encoded = base64.b64encode(png(12, 10)).decode()
    message = client.messages.create(model="see", max_tokens=64, messages=[{"role": "user", "content": [
        {"type": "text", "text": "Look"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": encoded}},
        {"type": "image", "source": {"type": "url", "url": files.add("/anthropic.png", png(6, 4))}},
    ]}])  # fmt: skip
    assert message.content[0].text == "You said: Look [image 12x10 png] [image 6x4 png]"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="see", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}])  # fmt: skip


def test_responses_input_images_reach_the_model(client):
    response = client.responses.create(model="see", input=[{"role": "user", "content": [
        {"type": "input_text", "text": "Look"},
        {"type": "input_image", "image_url": data_url(png(9, 7))},
    ]}])  # fmt: skip
    assert response.output_text == "You said: Look [image 9x7 png]"
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="see", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}])
    assert refused.value.body["code"] == "invalid_image"


def test_ollama_images_reach_the_model(server):
    import ollama

    client = ollama.Client(host=server.base_url)
    answer = client.chat(model="see", messages=[{"role": "user", "content": "Look", "images": [png(5, 3)]}])
    assert answer.message.content == "You said: Look [image 5x3 png]"
    generated = client.generate(model="see", prompt="Look", images=[encoded(png(4, 2), "JPEG")])
    assert generated.response == "You said: Look [image 4x2 jpeg]"
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="see", messages=[{"role": "user", "content": "Look", "images": [b"not an image"]}])
    assert refused.value.status_code == 400


# --- image generation routes ----------------------------------------------------------


def decoded(item) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_images_generate_returns_pngs_of_the_asked_size(client):
    result = client.images.generate(model="painter", prompt="a red fox", n=2, size="48x32", response_format="b64_json")
    assert len(result.data) == 2
    images = [decoded(item) for item in result.data]
    assert all(image.format == "PNG" and image.size == (48, 32) for image in images)
    assert result.output_format == "png"


def test_images_generate_with_a_seed_repeats_and_another_seed_differs(client):
    def colour(seed: int) -> tuple:
        result = client.images.generate(model="painter", prompt="a fox", size="8x8", extra_body={"seed": seed})
        return decoded(result.data[0]).getpixel((0, 0))

    assert colour(7) == colour(7)
    assert colour(7) != colour(8)


def test_output_format_jpeg_and_webp(client):
    for kind in ("jpeg", "webp"):
        result = client.images.generate(model="painter", prompt="a fox", size="16x16", extra_body={"output_format": kind})
        assert decoded(result.data[0]).format == kind.upper()


def test_images_edit_takes_the_uploaded_image(client):
    result = client.images.edit(model="painter", image=("in.png", png(16, 16, (0, 0, 0)), "image/png"), prompt="a fox", size="16x16")
    edited = decoded(result.data[0])
    generated = decoded(client.images.generate(model="painter", prompt="a fox", size="16x16").data[0])
    # the fake engine averages its colour with the input (black): every channel halves
    assert all(abs(e - g // 2) <= 1 for e, g in zip(edited.getpixel((0, 0)), generated.getpixel((0, 0))))


def test_image_requests_the_server_cannot_answer_are_bad_requests(client, server):
    refused(lambda: client.images.generate(model="painter", prompt="a fox", response_format="url"), "unsupported_parameter", "response_format")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="painter", prompt="a fox", size="huge")
    assert caught.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(model="see", prompt="a fox")
    assert caught.value.body["param"] == "model"
    refused(
        lambda: client.images.edit(model="painter", image=("in.png", b"not an image", "image/png"), prompt="a fox"),
        "invalid_image",
        "image",
    )
    refused(
        lambda: client.images.generate(model="painter", prompt="a fox", extra_body={"negative_prompt": "dogs"}),
        "unsupported_parameter",
        "negative_prompt",
    )
    assert nothing_busy(server)


async def test_generation_shows_its_progress_and_a_client_that_leaves_frees_the_instance(server):
    async with httpx.AsyncClient(base_url=server.url(""), timeout=60) as http:
        seen: list[dict] = []
        async with trio.open_nursery() as nursery:
            leave = trio.CancelScope()

            async def generate() -> None:
                with leave:
                    await http.post("/v1/images/generations", json={"model": "slow-painter", "prompt": "a slow fox", "steps": 100})
                    pytest.fail("100 steps of 0.2 s ended before the client left")

            nursery.start_soon(generate)
            with trio.fail_after(20):
                while not seen:
                    for instance in (await http.get("/")).json()["instances"]:
                        seen += [s["progress"] for s in instance["slots"] if s["busy"] and s["progress"]]
                    await trio.sleep(0.05)
            leave.cancel()  # the client goes away
        assert seen[0]["total"] == 100 and seen[0]["unit"] == "steps" and 0 < seen[0]["done"] < 100
        with trio.fail_after(5):  # the generation stopped between two steps
            while not await trio.to_thread.run_sync(nothing_busy, server):
                await trio.sleep(0.05)
        quick = {"model": "slow-painter", "prompt": "a quick fox", "size": "8x8", "steps": 1}
        assert (await http.post("/v1/images/generations", json=quick)).status_code == 200


def test_the_openapi_document_describes_the_image_routes_and_their_answers(server):
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    from lllms_core.api.openapi import openapi_document

    document = openapi_document()
    edit = document["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "mask", "prompt", "model", "strength"} <= set(edit["properties"]) and "image" in edit["required"]
    generation = document["components"]["schemas"]["ImageGenerationRequest"]
    assert {"prompt", "size", "seed", "steps", "guidance_scale"} <= set(generation["properties"])
    assert "image" not in generation["properties"]
    registry = Registry().with_resource("urn:lllms", Resource(document, DRAFT202012))
    body = httpx.post(server.url("/v1/images/generations"), json={"model": "painter", "prompt": "a fox", "n": 2}).json()
    Draft202012Validator({"$ref": "urn:lllms#/components/schemas/ImagesResponse"}, registry=registry).validate(body)
    validate("ImagesResponse", body)  # OpenAI's own description of the answer
    status = httpx.get(server.url("/")).json()
    Draft202012Validator({"$ref": "urn:lllms#/components/schemas/ServerStatus"}, registry=registry).validate(status)


async def test_describe_images_replaces_each_image_by_its_caption_once():
    from lllms_core.images import describe_images
    from lllms_core.schemas import ChatCompletionRequest, message_text

    red, blue = data_url(png(4, 4, (255, 0, 0))), data_url(png(4, 4, (0, 0, 255)))
    asked: list[str] = []

    async def caption(url: str) -> str:
        asked.append(url)
        return "a red square" if url == red else "a blue square"

    request = msgspec.convert({"model": "chat", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image_url", "image_url": {"url": red}},
                                     {"type": "text", "text": " and "}, {"type": "image_url", "image_url": {"url": blue}}]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "text", "text": "Again: "}, {"type": "image_url", "image_url": {"url": red}}]},
    ]}, ChatCompletionRequest)  # fmt: skip
    described = await describe_images(request, caption)
    assert asked == [red, blue]
    assert message_text(described.messages[0]) == "Compare [Image: a red square] and [Image: a blue square]"
    assert message_text(described.messages[2]) == "Again: [Image: a red square]"
