"""Images in chats with llama.cpp: the real SmolLM2 with a TINY randomly initialised
multimodal projector (a LLaVA-style "mlp" mmproj written here with the gguf package).

No small multimodal GGUF installs offline, so the projector's image embeddings are noise
and so is what the model says about them. These tests check what does not depend on
that: the projector is downloaded from a real HTTP server on 127.0.0.1 and verified as a
companion file, an image becomes 16 prompt tokens, a follow-up turn about the same image
reuses its evaluation while another image does not, a model without a projector refuses
images, and a wrong checksum fails the model's load.
"""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import openai
import pytest
from PIL import Image

from helpers.fileserver import FileServer
from lllms_core.testing import BackgroundServer

pytestmark = pytest.mark.timeout(300)

IMAGE_TOKENS = 16
"""32×32 pixels in patches of 8."""


def write_tiny_projector(path, text_embd: int, seed: int = 0) -> None:
    """A LLaVA-style projector: a 2-layer ViT (width 32) on 32×32 images, and a 2-layer MLP
    into the text model's embeddings."""
    import gguf

    rng = np.random.default_rng(seed)
    n_embd, n_ff, n_layer, image, patch = 32, 64, 2, 32, 8
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    for key, value in {
        "image_size": image, "patch_size": patch, "embedding_length": n_embd, "feed_forward_length": n_ff,
        "block_count": n_layer, "projection_dim": text_embd, "attention.head_count": 4,
    }.items():  # fmt: skip
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    def random(name: str, *shape: int) -> None:
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    random("v.patch_embd.weight", n_embd, 3, patch, patch)
    random("v.position_embd.weight", (image // patch) ** 2, n_embd)
    for block in range(n_layer):
        for norm in ("ln1", "ln2"):
            writer.add_tensor(f"v.blk.{block}.{norm}.weight", np.ones(n_embd, dtype=np.float32))
            random(f"v.blk.{block}.{norm}.bias", n_embd)
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            random(f"v.blk.{block}.{name}.weight", n_embd, n_embd)
            random(f"v.blk.{block}.{name}.bias", n_embd)
        random(f"v.blk.{block}.ffn_up.weight", n_ff, n_embd)
        random(f"v.blk.{block}.ffn_up.bias", n_ff)
        random(f"v.blk.{block}.ffn_down.weight", n_embd, n_ff)
        random(f"v.blk.{block}.ffn_down.bias", n_embd)
    random("mm.0.weight", text_embd, n_embd)
    random("mm.0.bias", text_embd)
    random("mm.2.weight", text_embd, text_embd)
    random("mm.2.bias", text_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def data_url(colour, size=(48, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(smollm2_file, tmp_path_factory):
    projector = tmp_path_factory.mktemp("projector") / "mmproj-tiny.gguf"
    write_tiny_projector(projector, text_embd=576)  # SmolLM2-135M's embedding width
    content = projector.read_bytes()
    with FileServer(tmp_path_factory.mktemp("files")) as files:
        url = files.add("/tiny/mmproj-tiny.gguf", content)
        model = {"engine": "llamacpp", "location": str(smollm2_file), "context_size": 1024, "parallel": 2,
                 "device": {"gpu": False, "cpu_threads": 1}, "ttl": 3600}  # fmt: skip
        config = {
            "server": {"cache_dir": str(tmp_path_factory.mktemp("cache"))},
            "models": {
                "see": {**model, "mmproj": {"url": url, "sha256": hashlib.sha256(content).hexdigest()}},
                "blind": model,
                "wrong": {**model, "mmproj": {"url": url, "sha256": "0" * 64}},
            },
        }
        running = BackgroundServer(config).start()
        running.files = files
        yield running
        running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=120, max_retries=0)


def user(*colours, text="Describe the picture."):
    return {"role": "user", "content": [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": data_url(colour)}} for colour in colours
    ]}  # fmt: skip


def ask(client, messages, model="see", **options):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, **options)


def test_an_image_becomes_prompt_tokens_of_the_model(client, server):
    with_image = ask(client, [user((200, 20, 20))])
    text_only = ask(client, [{"role": "user", "content": "Describe the picture."}])
    assert isinstance(with_image.choices[0].message.content, str)
    assert with_image.usage.completion_tokens > 0
    assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + IMAGE_TOKENS
    two = ask(client, [user((200, 20, 20), (20, 20, 200))])
    assert two.usage.prompt_tokens == text_only.usage.prompt_tokens + 2 * IMAGE_TOKENS
    assert len(server.files.gets("/tiny/mmproj-tiny.gguf")) == 1  # downloaded once, verified, kept


def test_a_follow_up_about_the_same_image_reuses_it_and_another_image_does_not(client):
    first_turn = [user((10, 160, 10), text="What colour is this?")]
    answer = ask(client, first_turn)
    follow_up = first_turn + [
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "Are you sure?"},
    ]
    again = ask(client, follow_up)
    assert again.usage.prompt_tokens_details.cached_tokens > IMAGE_TOKENS  # the image was not evaluated again
    other = ask(client, [user((160, 10, 160), text="What colour is this?")] + follow_up[1:])
    assert other.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens - IMAGE_TOKENS


def test_the_same_request_gives_the_same_answer_after_other_images(client):
    first = ask(client, [user((0, 90, 200))], seed=3)
    ask(client, [user((255, 255, 255))], seed=3)
    assert ask(client, [user((0, 90, 200))], seed=3).choices[0].message.content == first.choices[0].message.content


def test_an_image_streams(client):
    stream = ask(client, [user((90, 90, 90))], stream=True)
    chunks = list(stream)
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in chunks)


def test_a_model_without_a_projector_refuses_images(client):
    with pytest.raises(openai.BadRequestError) as refused:
        ask(client, [user((1, 2, 3))], model="blind")
    assert refused.value.body["param"] == "messages" and "mmproj" in refused.value.body["message"]


def test_a_projector_that_fails_its_checksum_is_a_load_error(client):
    with pytest.raises(openai.APIStatusError) as failed:
        ask(client, [user((1, 2, 3))], model="wrong")
    assert failed.value.status_code == 503 and failed.value.body["code"] == "checksum_mismatch"
