"""A model's generation_config.json gives the sampling defaults when it samples."""

from __future__ import annotations

from transformers import GenerationConfig

from lllms_transformers.generation import model_sampling_defaults


def test_a_sampling_generation_config_gives_defaults():
    config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, repetition_penalty=1.1)
    assert model_sampling_defaults(config) == {"temperature": 0.6, "top_p": 0.9, "repeat_penalty": 1.1}


def test_a_greedy_or_empty_generation_config_leaves_openai_defaults():
    assert model_sampling_defaults(GenerationConfig(eos_token_id=2)) == {}
    assert model_sampling_defaults(GenerationConfig(do_sample=False, top_k=5)) == {}
