"""Sequences: prefix reuse, isolation, preload, overflow, cancellation, batching."""

from __future__ import annotations

import time

import pytest
import trio

from lllms_core.config import ChatMessageConfig
from lllms_core.engine import ChunkSink
from lllms_core.errors import ContextLengthExceededError
from lllms_core.schemas import AssistantMessage, ChatCompletionRequest, SystemMessage, UserMessage



async def test_second_turn_reuses_the_first_turns_tokens(smol):
    first = [UserMessage(content="What is a horse? Answer in one sentence.")]
    answer, _, turn1 = await smol.chat(slot=2, messages=first)
    assert turn1.usage.cached_tokens < turn1.usage.prompt_tokens
    second = [*first, AssistantMessage(content=answer), UserMessage(content="And a pony?")]
    _, _, turn2 = await smol.chat(slot=2, messages=second)
    seen = turn1.usage.prompt_tokens + turn1.usage.completion_tokens
    assert seen - 3 <= turn2.usage.cached_tokens <= seen
    assert turn2.usage.prompt_tokens > seen


async def test_a_follow_up_keeps_an_answer_the_tokenizer_would_split_otherwise(smol):
    """The sequence holds the answer as generated; the follow-up resends it as text, whose
    tokens differ (here: one token per character), and still nothing of it is evaluated again."""
    instance = smol.instance
    first = [UserMessage(content="Say hello.")]
    answer = "Hello there, my good friend."
    spelled_by_characters = [token for character in answer
                             for token in instance.model.tokenize(character, add_special=False, parse_special=False)]
    held = instance.tokenize_rendered(instance.template.prompt(first)) + spelled_by_characters
    await smol.complete(slot=1, prompt=held, max_tokens=1)
    assert instance.slot_states[1].tokens == held
    second = [*first, AssistantMessage(content=answer), UserMessage(content="And goodbye?")]
    _, _, result = await smol.chat(slot=1, messages=second, max_tokens=2)
    assert result.usage.cached_tokens == len(held)


async def test_conversations_on_other_slots_never_leak(smol):
    secret = [UserMessage(content="My secret password is Zorblax. Remember it.")]
    await smol.chat(slot=3, messages=secret, max_tokens=4)
    question = [UserMessage(content="What is my secret password?")]
    text, _, result = await smol.chat(slot=4, messages=question)
    assert "Zorblax" not in text
    assert result.usage.cached_tokens < result.usage.prompt_tokens
    assert "Zorblax" not in smol.instance.model.detokenize(smol.instance.slot_states[4].tokens)
    assert "Zorblax" in smol.instance.model.detokenize(smol.instance.slot_states[3].tokens)


async def test_a_shared_system_prompt_is_copied_from_another_sequence(smol):
    system = SystemMessage(content="You are a concise assistant. " * 20)
    _, _, first = await smol.chat(slot=5, messages=[system, UserMessage(content="Name a color.")], max_tokens=2)
    _, _, second = await smol.chat(slot=6, messages=[system, UserMessage(content="Name a fruit.")], max_tokens=2)
    assert second.usage.cached_tokens > 100


@pytest.mark.parametrize("repeats", [4, 36])
async def test_a_prefix_copied_from_another_sequence_continues_as_the_one_holding_it_would(smol, repeats):
    """A sequence using under a quarter of its cells is copied through its saved state, a
    fuller one as a whole cache (4 and 36 repeats: about 80 and 390 of 512 tokens); either way
    the copy answers as the sequence it came from does when asked again."""
    messages = [SystemMessage(content=f"You answer in French, briefly ({repeats}). " * repeats),
                UserMessage(content="Name a fruit.")]
    _, _, first = await smol.chat(slot=5, messages=messages)
    held, _, again = await smol.chat(slot=5, messages=messages)
    copied, _, other = await smol.chat(slot=6, messages=messages)
    assert first.usage.cached_tokens < 20  # at most the template's opening, held elsewhere
    assert again.usage.cached_tokens == other.usage.cached_tokens == first.usage.prompt_tokens - 1
    assert copied == held, first.usage.prompt_tokens


async def test_preload_evaluates_initial_messages_into_the_slot(smol, model_config):
    config = model_config(parallel=8)
    config.initial_messages = [ChatMessageConfig(role="system", content="You are a librarian who loves old maps. " * 5)]
    await smol.engine.preload(smol.context(slot=7, config=config, fresh=True))
    preloaded = len(smol.instance.slot_states[7].tokens)
    assert preloaded > 50
    messages = [SystemMessage(content=config.initial_messages[0].content), UserMessage(content="Hello!")]
    request = ChatCompletionRequest(model="smollm2", messages=messages, max_tokens=2, temperature=0)
    result = await smol.engine.chat_completion(smol.context(slot=7, config=config), request, ChunkSink(lambda c: None))
    assert result.usage.cached_tokens >= preloaded - 2


async def test_text_prefix_preload(smol, model_config):
    config = model_config(parallel=8)
    config.prefix = "Once upon a time, in a kingdom far away, there lived a"
    await smol.engine.preload(smol.context(slot=7, config=config, fresh=True))
    _, _, result = await smol.complete(slot=7, prompt=config.prefix + " dragon", max_tokens=2)
    assert result.usage.cached_tokens >= result.usage.prompt_tokens - 3


async def test_overlong_conversation_drops_the_oldest_turns(smol):
    messages = [SystemMessage(content="Your name is Bartholomew.")]
    for turn in range(30):
        messages += [UserMessage(content=f"Tell me fact number {turn} about rivers."), AssistantMessage(content="Rivers flow to the sea. " * 3)]
    messages.append(UserMessage(content="What is your name?"))
    _, _, result = await smol.chat(slot=0, messages=messages, max_tokens=2)
    assert result.usage.prompt_tokens < smol.instance.n_ctx_seq
    seen = smol.instance.model.detokenize(smol.instance.slot_states[0].tokens)
    assert "Bartholomew" in seen and "What is your name?" in seen
    assert "fact number 0 " not in seen and "fact number 29 " in seen


async def test_overlong_prompt_is_refused_under_the_error_policy(strict):
    long = [UserMessage(content="Tell me about rivers. " * 80)]
    with pytest.raises(ContextLengthExceededError) as caught:
        await strict.chat(messages=long)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.status == 400
    with pytest.raises(ContextLengthExceededError):
        await strict.complete(prompt="rivers " * 300)
    text, _, _ = await strict.chat(messages=[UserMessage(content="Say hello.")], max_tokens=3)
    assert text


async def test_overlong_text_prompt_keeps_its_end(smol):
    prompt = "Chapter one. " + "one two three four " * 200 + "the end"
    _, _, result = await smol.complete(slot=0, prompt=prompt, max_tokens=3)
    assert result.usage.prompt_tokens < smol.instance.n_ctx_seq
    assert result.usage.completion_tokens == 3
    seen = smol.instance.model.detokenize(smol.instance.slot_states[0].tokens)
    assert "the end" in seen and "Chapter one" not in seen


async def test_generation_stops_with_length_at_the_context_end(strict):
    prompt = "The list of numbers: " + ", ".join(str(n) for n in range(60))
    text, _, result = await strict.complete(prompt=prompt, max_tokens=None, temperature=0)
    assert result.finish_reasons == ["length"]
    assert result.usage.prompt_tokens + result.usage.completion_tokens == strict.instance.n_ctx_seq


async def test_cancelling_a_request_frees_its_sequence_while_others_continue(smol):
    scheduler = smol.instance.scheduler
    chunks: list = []
    long = ChatCompletionRequest(
        model="smollm2", messages=[UserMessage(content="Write a long story about a dragon.")], max_tokens=400, temperature=0
    )
    other_result = {}

    async def other():
        other_result["value"] = await smol.chat(slot=1, messages=[UserMessage(content="What is a dog?")], max_tokens=20)

    async with trio.open_nursery() as nursery:
        with trio.move_on_after(30) as scope:
            nursery.start_soon(other)
            sink = ChunkSink(chunks.append)
            with trio.CancelScope() as cancel:

                async def cancel_after_five():
                    while len(chunks) < 5:
                        await trio.sleep(0.01)
                    cancel.cancel()

                nursery.start_soon(cancel_after_five)
                await smol.engine.chat_completion(smol.context(slot=0), long, sink)
            assert cancel.cancelled_caught
            generated_at_cancel = len(chunks)
    assert not scope.cancelled_caught
    assert len(chunks) <= generated_at_cancel + 2  # nothing more arrives after the cancel
    _, _, result = other_result["value"]
    assert result.usage.completion_tokens == 20
    assert 0 not in scheduler.busy and not scheduler.active
    text, _, _ = await smol.chat(slot=0, messages=[UserMessage(content="Say hello.")], max_tokens=3)
    assert text


async def test_eight_concurrent_requests_each_get_their_own_answer(smol):
    words = ["apple", "banana", "cherry", "dog", "river", "guitar", "orange", "tiger"]
    answers: dict[str, str] = {}
    tokens = 0

    async def ask(slot: int, word: str) -> None:
        nonlocal tokens
        text, _, result = await smol.chat(
            slot=slot, messages=[UserMessage(content=f"What is a {word}? Answer in one sentence.")], max_tokens=12
        )
        answers[word] = text
        tokens += result.usage.completion_tokens

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for slot, word in enumerate(words):
            nursery.start_soon(ask, slot, word)
    elapsed = time.perf_counter() - started
    print(f"8 sequences: {tokens} tokens in {elapsed:.2f}s = {tokens / elapsed:.1f} tokens/s")
    for word in words:
        assert word in answers[word].lower(), (word, answers[word])
    info = smol.instance.info()
    assert info["device"]["cpu_threads"] == 1
    for sequence in info["sequences"][:8]:
        assert sequence["tokens"] > 20
        assert sequence["kv_bytes"] == sequence["tokens"] * info["kv_bytes_per_token"]


async def test_a_step_batches_its_sequences_in_order_whatever_order_they_came_in(smol, monkeypatch):
    """Over a KV cache per sequence, llama.cpp computes a batch in one pass only where its
    sequence ids run in order (a pass per run otherwise: measured 28% slower for 8 sequences
    in shuffled order), so requests that arrive in any order still take one pass a step."""
    context = smol.instance.context
    assert not context.settings.kv_unified
    batches: list[list[int]] = []
    decode = context.decode

    def recording_decode() -> int:
        batch = context.batch
        batches.append([batch.seq_id[index][0] for index in range(batch.n_tokens)])
        return decode()

    monkeypatch.setattr(context, "decode", recording_decode)
    async with trio.open_nursery() as nursery:
        for slot in (6, 1, 7, 3, 0, 5, 2, 4):
            nursery.start_soon(lambda slot=slot: smol.chat(slot=slot, messages=[UserMessage(content=f"Count to {slot + 5}.")],
                                                          max_tokens=24))
            await trio.sleep(0.05)
    together = [batch for batch in batches if len(set(batch)) >= 4]
    assert together, batches
    for batch in batches:
        assert batch == sorted(batch), batch


async def test_choices_outgrowing_the_kv_cells_end_with_length(strict):
    # one sequence of 256 cells, three choices each allowed to fill it: the cells run out
    prompt = "Write a very long story about a dragon: "
    _, chunks, result = await strict.complete(prompt=prompt, n=3, max_tokens=None, temperature=1.0, seed=3,
                                              logit_bias={"2": -100, "0": -100})
    assert set(result.finish_reasons) <= {"length", "stop"}
    assert result.usage.completion_tokens > 100
    text, _, _ = await strict.chat(messages=[UserMessage(content="Say hello.")], max_tokens=3)
    assert text
