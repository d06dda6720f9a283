"""Image generation and edits through the HTTP API with the openai client.

The pipeline is a TINY randomly initialised Stable Diffusion (see conftest): its images
are noise. These tests check what a user notices besides the picture: valid PNGs of the
size asked for, the same images for the same seed, edits and masked edits, refusals
with 400, progress in the status while a generation runs, and a client that goes away
freeing the instance between two steps.
"""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest
import trio
from PIL import Image

pytestmark = pytest.mark.timeout(180)


def png(width: int, height: int, colour=(0, 120, 255, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def images_of(result) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(item.b64_json))) for item in result.data]


def raw(result) -> list[bytes]:
    return [base64.b64decode(item.b64_json) for item in result.data]


def busy_slots(server) -> list[dict]:
    status = httpx.get(server.url("/")).json()
    return [slot for instance in status["instances"] for slot in instance["slots"] if slot["busy"]]


def test_generate_gives_n_pngs_of_the_asked_size(client):
    result = client.images.generate(model="paint", prompt="a lighthouse at dusk", n=2, size="48x40", response_format="b64_json")
    images = images_of(result)
    assert [image.format for image in images] == ["PNG", "PNG"]
    assert [image.size for image in images] == [(48, 40), (48, 40)]
    assert images[0].tobytes() != images[1].tobytes()  # each image has its own seed


def test_without_a_size_the_model_paints_at_its_native_size(client):
    [image] = images_of(client.images.generate(model="paint", prompt="a lighthouse"))
    assert image.size == (32, 32)


def test_the_same_seed_gives_the_same_images(client):
    def paint(seed: int, n: int = 1) -> list[bytes]:
        return raw(client.images.generate(model="paint", prompt="a red fox", n=n, size="32x32", extra_body={"seed": seed}))

    first, again, other = paint(11), paint(11), paint(12)
    assert first == again
    assert first != other
    assert paint(11, n=2)[0] == first[0]  # image i uses seed + i, whatever n


def test_steps_guidance_negative_prompt_and_output_format(client):
    result = client.images.generate(
        model="paint", prompt="a fox", size="32x32",
        extra_body={"steps": 2, "guidance_scale": 1.0, "negative_prompt": "dogs", "output_format": "webp", "seed": 1},
    )  # fmt: skip
    [image] = images_of(result)
    assert image.format == "WEBP" and result.output_format == "webp"


def test_edit_repaints_the_uploaded_image(client):
    def edit(**extra) -> bytes:
        result = client.images.edit(
            model="paint", image=("photo.png", png(32, 32), "image/png"), prompt="the same, at night",
            size="32x32", extra_body={"seed": 3, **extra},
        )  # fmt: skip
        [image] = images_of(result)
        assert image.size == (32, 32)
        return raw(result)[0]

    assert edit() == edit()
    assert edit(strength=0.3) != edit(strength=0.9)
    generated = raw(client.images.generate(model="paint", prompt="the same, at night", size="32x32", extra_body={"seed": 3}))
    assert edit() != generated[0]


def test_edit_with_a_mask_paints_where_the_mask_is_transparent(client):
    mask = png(32, 32, (0, 0, 0, 255))
    opened = Image.open(io.BytesIO(mask))
    opened.paste((0, 0, 0, 0), (0, 0, 16, 32))  # the left half is to be painted
    buffer = io.BytesIO()
    opened.save(buffer, format="PNG")
    result = client.images.edit(
        model="paint", image=("photo.png", png(32, 32), "image/png"), mask=("mask.png", buffer.getvalue(), "image/png"),
        prompt="a window", size="32x32", extra_body={"seed": 5},
    )  # fmt: skip
    [image] = images_of(result)
    assert image.size == (32, 32)


def test_sizes_the_model_cannot_make_are_bad_requests(client, server):
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="paint", prompt="a fox", size="30x30")  # not a multiple of 8
    assert "30" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="paint", prompt="a fox", size="4096x4096")
    assert refused.value.body["param"] == "size"
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.edit(model="paint", image=("photo.png", png(8, 8), "image/png"), mask=("mask.png", b"GIF89a", "image/gif"), prompt="x")
    assert refused.value.body["param"] == "mask"
    assert not busy_slots(server)


async def test_progress_shows_in_the_status_and_a_client_that_leaves_stops_the_generation(server):
    async with httpx.AsyncClient(base_url=server.url(""), timeout=120) as http:

        async def busy() -> list[dict]:
            status = (await http.get("/")).json()
            return [slot for instance in status["instances"] for slot in instance["slots"] if slot["busy"]]

        seen: list[dict] = []
        async with trio.open_nursery() as nursery:
            leave = trio.CancelScope()

            async def paint() -> None:
                with leave:
                    body = {"model": "paint", "prompt": "a long night", "size": "128x128", "steps": 1000}
                    await http.post("/v1/images/generations", json=body)
                    pytest.fail("the generation ended before the client left: make it longer")

            nursery.start_soon(paint)
            with trio.fail_after(60):
                while not seen:
                    seen += [slot["progress"] for slot in await busy() if slot["progress"]]
                    await trio.sleep(0.05)
            leave.cancel()  # the client goes away: its connection closes
        assert seen[0]["total"] == 1000 and 0 < seen[0]["done"] < 1000 and seen[0]["unit"] == "steps"
        with trio.fail_after(10):  # stopped between two steps, far from the 1000th
            while await busy():
                await trio.sleep(0.05)
        response = await http.post("/v1/images/generations", json={"model": "paint", "prompt": "a short night", "size": "32x32"})
        assert response.status_code == 200
