"""Images with the transformers engine: CLIP-style embeddings of texts and images, and
image to text (captioning) through chat and through the library facade.

The CLIP and the BLIP are TINY randomly initialised models (see conftest): their vectors
and captions are noise. These tests check what does not depend on training: one vector
space for texts and images (same dimensions, unit length), the same image giving the same
vector, captions as text through the openai client, and refusals.
"""

from __future__ import annotations

import base64
import io
import math

import openai
import pytest
from PIL import Image

from lllms_core.server import ModelServer

pytestmark = pytest.mark.timeout(180)


def data_url(colour, size=(40, 30), kind="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=kind)
    return f"data:image/{kind.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))


def test_texts_and_images_embed_into_one_space(client):
    red, blue = data_url((255, 0, 0)), data_url((0, 0, 255), kind="JPEG")
    result = client.embeddings.create(model="clip", input=["a red square", red, blue, red], encoding_format="float")
    vectors = [item.embedding for item in result.data]
    assert [item.index for item in result.data] == [0, 1, 2, 3]
    assert {len(vector) for vector in vectors} == {16}
    assert all(math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-4) for vector in vectors)
    assert vectors[1] == pytest.approx(vectors[3], abs=1e-6)  # the same image, the same vector
    assert cosine(vectors[1], vectors[2]) < 0.9999  # another image, another vector
    assert -1 <= cosine(vectors[0], vectors[1]) <= 1
    assert result.usage.prompt_tokens > 0  # the text's tokens; images count none


def test_image_embeddings_with_dimensions_and_base64(client):
    result = client.embeddings.create(model="clip", input=data_url((0, 200, 0)), dimensions=8)
    assert len(result.data[0].embedding) == 8  # the client asked for base64 and decoded it


def test_a_text_only_embedding_model_refuses_images(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="minilm", input=["words", data_url((1, 2, 3))])
    assert refused.value.body["param"] == "input" and refused.value.body["code"] == "unsupported_parameter"


def test_a_captioning_model_answers_a_chat_with_an_image(client):
    answer = client.chat.completions.create(
        model="blip",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url((250, 200, 0))}}]}],
        max_tokens=8,
    )
    choice = answer.choices[0]
    assert isinstance(choice.message.content, str) and choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert 0 < answer.usage.completion_tokens <= 8


def test_a_captioning_chat_streams_and_takes_a_prompt(client):
    stream = client.chat.completions.create(
        model="blip",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "a picture of"},
            {"type": "image_url", "image_url": {"url": data_url((0, 0, 0))}},
        ]}],
        max_tokens=6, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_captioning_model_needs_an_image_and_refuses_tools(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="blip", messages=[{"role": "user", "content": "Describe nothing"}])
    assert refused.value.body["param"] == "messages"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="blip", tools=tools,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url((9, 9, 9))}}]}],
        )  # fmt: skip
    assert refused.value.body["param"] == "tools"


async def test_image_to_text_through_the_library(blip_dir):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 120, 30)).save(buffer, format="PNG")
    config = {"models": {"blip": {"engine": "transformers", "location": str(blip_dir), "task": "image-to-text"}}}
    async with ModelServer(config) as server:
        result = await server.image_to_text({"model": "blip", "image": buffer.getvalue(), "max_tokens": 5})
        assert isinstance(result.text, str) and result.text.strip()
        with pytest.raises(Exception) as refused:
            await server.image_to_text({"model": "blip", "image": b"not an image"})
        assert getattr(refused.value, "code", None) == "invalid_image"


# --- a vision-language chat model (a TINY random Idefics3: its answers are noise) ------------


def look(client, *colours, text="What is in the picture?", **options):
    parts = [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": data_url(colour)}} for colour in colours
    ]
    return client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": parts}], max_tokens=6, **options)


def test_a_vision_language_model_answers_about_an_image(client):
    with_image = look(client, (200, 30, 30), temperature=0)
    without = client.chat.completions.create(
        model="vlm", messages=[{"role": "user", "content": "What is in the picture?"}], max_tokens=6, temperature=0
    )
    assert isinstance(with_image.choices[0].message.content, str)
    assert with_image.usage.completion_tokens > 0
    # the image became tokens of the prompt: 4 image tokens and their markers
    assert with_image.usage.prompt_tokens >= without.usage.prompt_tokens + 4
    two = look(client, (200, 30, 30), (30, 30, 200), temperature=0)
    assert two.usage.prompt_tokens >= with_image.usage.prompt_tokens + 4


def test_answers_about_one_image_do_not_leak_into_answers_about_another(client):
    first = look(client, (250, 250, 0), temperature=0, seed=1)
    look(client, (0, 0, 0), temperature=0, seed=1)
    again = look(client, (250, 250, 0), temperature=0, seed=1)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # image tokens do not tell images apart


def test_a_vision_language_answer_streams(client):
    stream = look(client, (10, 200, 10), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.prompt_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_a_text_only_model_refuses_images(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url((1, 1, 1))}}]}],
        )
    assert refused.value.body["param"] == "messages" and refused.value.body["code"] == "unsupported_parameter"
