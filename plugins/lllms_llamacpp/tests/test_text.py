"""Text completions: raw prompts, token prompts, echo, several prompts, suffix."""

from __future__ import annotations

import pytest

from lllms_core.errors import InvalidRequestError, UnsupportedParameterError


async def test_continues_a_raw_prompt(smol):
    text, _, result = await smol.complete(prompt="The capital of France is", max_tokens=3)
    assert "Paris" in text
    assert result.usage.prompt_tokens == 5


async def test_token_prompt_gives_the_same_answer(smol):
    tokens = smol.instance.model.tokenize("The capital of France is", add_special=True, parse_special=False)
    by_text, _, _ = await smol.complete(prompt="The capital of France is", max_tokens=3)
    by_tokens, _, result = await smol.complete(slot=1, prompt=tokens, max_tokens=3)
    assert by_tokens == by_text
    assert result.usage.prompt_tokens == len(tokens)


async def test_echo_returns_the_prompt_first(smol):
    text, chunks, _ = await smol.complete(prompt="The capital of France is", max_tokens=3, echo=True)
    assert chunks[0].text == "The capital of France is"
    assert text.startswith("The capital of France is") and "Paris" in text


async def test_several_prompts_with_n_choices(smol):
    _, chunks, result = await smol.complete(
        prompt=["The capital of France is", "The capital of Italy is"], n=2, max_tokens=3
    )
    texts = ["".join(c.text for c in chunks if c.index == index) for index in range(4)]
    assert "Paris" in texts[0] and "Paris" in texts[1]
    assert "Rome" in texts[2] and "Rome" in texts[3]
    assert len(result.finish_reasons) == 4
    assert result.usage.completion_tokens == 12


async def test_legacy_logprobs(smol):
    _, chunks, _ = await smol.complete(prompt="The capital of France is", max_tokens=3, logprobs=2)
    entries = [entry for chunk in chunks for entry in chunk.logprobs or []]
    assert len(entries) == 3
    assert all(len(entry.top_logprobs) == 2 for entry in entries)


async def test_suffix_needs_fill_in_the_middle_tokens(smol):
    with pytest.raises(UnsupportedParameterError) as caught:
        await smol.complete(prompt="def add(a, b):", suffix="    return c")
    assert caught.value.param == "suffix"


async def test_token_ids_outside_the_vocabulary_are_refused(smol):
    with pytest.raises(InvalidRequestError) as caught:
        await smol.complete(prompt=[1, 2, 10_000_000])
    assert caught.value.param == "prompt"
