"""The engine conformance suite: the contract every engine keeps, checked against a real
instance of it.

An engine package runs it against itself from one test module::

    import pytest
    from lllms_core.testing.conformance import ConformanceModels, EngineConformance

    @pytest.fixture(scope="session")
    def conformance_models():
        config = {"models": {
            "chat": {"engine": "myengine", "url": "...", "context_size": 512},
            "embed": {"engine": "myengine", "task": "embedding", "url": "..."},
        }}
        with ConformanceModels.serve(config, chat="chat", embedding="embed") as models:
            yield models

    class TestConformance(EngineConformance):
        pass

The checks call the engine's methods directly (in the loop of a real server, on a slot its
pool hands out), so they see the chunks the engine sends and the result it returns. Each
applies where the engine declares the capability or task it needs, and is skipped, saying
so, where it does not:

- the chunk contract and usage accounting (chat and text);
- stop strings that span tokens are cut exactly and never sent;
- ``n`` > 1: every choice has its index, its text and one finish reason;
- cancellation within a token, and a slot that answers as before afterwards;
- tool-call deltas in order: the first delta of a call names it, arguments are JSON;
- bad input is a 4xx :class:`~lllms_core.errors.LllmsError`, never a 500 or another exception;
- embeddings: one unit-length vector per input, in order, ``dimensions`` honoured;
- ``logprobs``, ``seed`` and ``echo`` do what they say.

Generation is greedy (``temperature: 0``) where the engine declares ``temperature``; an
engine without it must be deterministic. Keep the models small and their ``context_size``
small: the suite generates a few hundred tokens in all.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import msgspec
import pytest
import trio

from lllms_core.engine import ChunkSink, TaskContext
from lllms_core.errors import LllmsError
from lllms_core.pool import Slot
from lllms_core.schemas import CompletionChunk
from lllms_core.server import ModelServer
from lllms_core.tasks import tasks_served
from lllms_core.testing import BackgroundServer

T = TypeVar("T")

CHAT = "chat-completion"
TEXT = "text-completion"
CALL_TIMEOUT = 300
"""Seconds an engine call may take before the suite calls it hung."""

STORY_MESSAGES = [{"role": "user", "content": "Tell me a long story about a dragon who learns to fly."}]
STORY_PROMPT = "Once upon a time, in a kingdom by the sea, there lived"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
DEFAULT_CONTEXT = 1024
"""Tokens assumed for a model without ``context_size``, to make input longer than its context."""
TOKEN_IDS = list(range(100, 110))
"""A token prompt every vocabulary of more than 110 tokens can take."""
OUT_OF_VOCABULARY = 2**31 - 1


class EngineCall:
    """What one engine call did: the chunks it sent, its result or the exception it raised,
    and, for a call cancelled by the suite, how many chunks still arrived after the cancel."""

    def __init__(self) -> None:
        self.chunks: list[CompletionChunk] = []
        self.result: Any = None
        self.error: Exception | None = None
        self.cancelled_at: int | None = None
        """How many chunks had arrived when the suite cancelled the call."""

    def text(self, index: int = 0) -> str:
        return "".join(chunk.text for chunk in self.chunks if chunk.index == index)

    def pieces(self, index: int = 0) -> list[str]:
        return [chunk.text for chunk in self.chunks if chunk.index == index and chunk.text]

    @property
    def chunks_after_cancel(self) -> int:
        assert self.cancelled_at is not None
        return len(self.chunks) - self.cancelled_at

    def raised(self) -> "EngineCall":
        """This call, after checking that it ended without an exception."""
        if self.error is not None:
            raise AssertionError(f"the engine raised {type(self.error).__name__}: {self.error}") from self.error
        return self


class SlotRunner:
    """Runs engine calls on one slot of the pool (in the server's trio loop)."""

    def __init__(self, server: ModelServer, slot: Slot):
        self.server = server
        self.slot = slot
        self.model = slot.instance.model
        self.engine = slot.instance.engine

    async def call(self, task_name: str, request: dict[str, Any], *, fresh: bool = True, cancel_after: int | None = None) -> EngineCall:
        """Call the engine method of ``task_name`` with ``request`` (a dict, converted to the
        task's request Struct). ``fresh``: tell the engine the slot's context is not its own.
        ``cancel_after``: cancel the call once that many chunks arrived."""
        task = self.server.plugins.tasks[task_name]
        parsed = msgspec.convert({"model": self.model.id, **request}, task.request)
        context = TaskContext(instance=self.slot.instance.engine_instance, slot=self.slot.index, model=self.model, fresh=fresh)
        call = EngineCall()
        method = getattr(self.engine, task.method)
        with trio.CancelScope() as scope:

            def on_chunk(chunk: CompletionChunk) -> None:
                call.chunks.append(chunk)
                if cancel_after is not None and call.cancelled_at is None and len(call.chunks) >= cancel_after:
                    call.cancelled_at = len(call.chunks)
                    scope.cancel()

            with trio.fail_after(CALL_TIMEOUT):
                try:
                    if task.streams:
                        call.result = await method(context, parsed, ChunkSink(on_chunk))
                    else:
                        call.result = await method(context, parsed)
                except Exception as error:
                    call.error = error
        if cancel_after is not None and call.cancelled_at is None:
            raise AssertionError(f"the engine sent {len(call.chunks)} chunks, fewer than the {cancel_after} to cancel after")
        return call


class ConformanceModels:
    """The models the suite checks, served by a running server: ``chat`` (a chat-completion
    model; it also answers text completions), ``text`` (a text-completion model, by default
    the chat model) and ``embedding``, each a model id or None when the engine lacks the task.

    ``server`` is a :class:`BackgroundServer` wrapping a :class:`ModelServer`; a package may
    pass the one its other tests use, so that each model is loaded once per session."""

    def __init__(self, server: BackgroundServer, *, chat: str | None = None, text: str | None = None, embedding: str | None = None):
        self.server = server
        self.model_server = server.model_server
        self.chat = chat
        self.text = text or (chat if chat is not None and TEXT in tasks_served(self.config(chat).task) else None)
        self.embedding = embedding

    @classmethod
    @contextmanager
    def serve(cls, config: Any, *, plugins: Any = None, **models: str | None) -> Iterator["ConformanceModels"]:
        """Serve ``config`` (a dict or TOML path) while the block runs."""
        with BackgroundServer(ModelServer(config, plugins=plugins)) as server:
            yield cls(server, **models)

    def config(self, model_id: str):
        return self.model_server.config.models[model_id]

    def model_for(self, task_name: str) -> str:
        """The model id that checks ``task_name``; skips the check when there is none."""
        model_id = {CHAT: self.chat, TEXT: self.text, "embedding": self.embedding}[task_name]
        if model_id is None:
            pytest.skip(f"no {task_name} model to check")
        return model_id

    def capabilities(self, model_id: str) -> frozenset[str]:
        return self.model_server.engines[self.config(model_id).engine].capabilities

    def require(self, model_id: str, *capabilities: str) -> None:
        missing = [name for name in capabilities if name not in self.capabilities(model_id)]
        if missing:
            engine = self.config(model_id).engine
            pytest.skip(f"engine {engine!r} does not declare {', '.join(missing)}")

    def on_slot(self, model_id: str, steps: Callable[[SlotRunner], Awaitable[T]]) -> T:
        """Run ``steps(runner)`` with one slot of ``model_id`` held throughout."""
        server = self.model_server

        async def run() -> T:
            async with server.pool.acquire(model_id) as slot:
                try:
                    return await steps(SlotRunner(server, slot))
                finally:
                    slot.reset()  # the engine's state of the slot is not what the pool's key says

        return self.server.run(run)

    def call(self, model_id: str, task_name: str, request: dict[str, Any], **options: Any) -> EngineCall:
        return self.on_slot(model_id, lambda runner: runner.call(task_name, request, **options))

    def request(self, model_id: str, task_name: str, **fields: Any) -> dict[str, Any]:
        """The suite's story prompt for ``task_name``, greedy where the engine can be told so."""
        request: dict[str, Any] = {"messages": STORY_MESSAGES} if task_name == CHAT else {"prompt": STORY_PROMPT}
        if "temperature" in self.capabilities(model_id):
            request["temperature"] = 0
        return {**request, **fields}


def completion_tasks() -> Any:
    return pytest.mark.parametrize("task", [CHAT, TEXT])


def spanning_stop(pieces: list[str]) -> str | None:
    """A stop string made of the end of one chunk and the start of the next, whose first
    occurrence in the text is at that boundary."""
    text = "".join(pieces)
    boundary = 0
    for left_piece, right_piece in zip(pieces, pieces[1:]):
        boundary += len(left_piece)
        left, right = left_piece[-2:], right_piece[:2]
        stop = left + right
        if stop.strip() and text.find(stop) == boundary - len(left):
            return stop
    return None


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))


def assert_unit_length(vector: list[float]) -> None:
    assert abs(math.hypot(*vector) - 1) < 1e-3, f"an embedding of length {math.hypot(*vector)}, not 1"


class EngineConformance:
    """The checks; subclass it in a test module (``class TestConformance(EngineConformance): pass``)
    and provide the ``conformance_models`` fixture (a :class:`ConformanceModels`)."""

    # --- completions --------------------------------------------------------------------

    @completion_tasks()
    def test_chunks_and_usage_add_up(self, conformance_models: ConformanceModels, task: str):
        models = conformance_models
        model = models.model_for(task)
        call = models.call(model, task, models.request(model, task, max_tokens=8)).raised()
        assert {chunk.index for chunk in call.chunks} == {0}, "one choice: every chunk has index 0"
        assert call.text(), "the answer has text"
        result = call.result
        assert len(result.finish_reasons) == 1, "one finish reason per choice"
        assert result.finish_reasons[0] in ("stop", "length")
        usage = result.usage
        assert usage.prompt_tokens > 0
        assert 0 < usage.completion_tokens <= 8, "completion_tokens counts the tokens generated, at most max_tokens"
        assert 0 <= usage.cached_tokens <= usage.prompt_tokens
        if result.finish_reasons[0] == "length":
            assert usage.completion_tokens == 8, "an answer cut by max_tokens has max_tokens tokens"

    def test_a_token_prompt_counts_its_tokens(self, conformance_models: ConformanceModels):
        models = conformance_models
        model = models.model_for(TEXT)
        models.require(model, "token_prompt")
        call = models.call(model, TEXT, models.request(model, TEXT, prompt=TOKEN_IDS, max_tokens=2)).raised()
        assert call.result.usage.prompt_tokens == len(TOKEN_IDS)

    @completion_tasks()
    def test_stop_strings_spanning_tokens_are_cut_exactly(self, conformance_models: ConformanceModels, task: str):
        models = conformance_models
        model = models.model_for(task)
        free = models.call(model, task, models.request(model, task, max_tokens=24)).raised()
        stop = spanning_stop(free.pieces())
        assert stop is not None, f"the answer needs text in at least two chunks to check stop strings: {free.pieces()}"
        text = free.text()
        stopped = models.call(model, task, models.request(model, task, max_tokens=24, stop=["never said", stop])).raised()
        assert stopped.text() == text[: text.index(stop)], f"stop {stop!r}: the text ends where the stop string starts"
        assert stopped.result.finish_reasons == ["stop"]

    @completion_tasks()
    def test_n_choices_each_have_their_index_text_and_finish_reason(self, conformance_models: ConformanceModels, task: str):
        models = conformance_models
        model = models.model_for(task)
        models.require(model, "n")
        several = models.call(model, task, models.request(model, task, max_tokens=6, n=3)).raised()
        one = models.call(model, task, models.request(model, task, max_tokens=6)).raised()
        assert {chunk.index for chunk in several.chunks} == {0, 1, 2}
        assert all(several.text(index) for index in range(3)), "every choice has text"
        reasons = several.result.finish_reasons
        assert len(reasons) == 3 and set(reasons) <= {"stop", "length"}
        usage = several.result.usage
        assert usage.prompt_tokens == one.result.usage.prompt_tokens, "the prompt counts once, not once per choice"
        if reasons == ["length"] * 3:
            assert usage.completion_tokens == 18, "completion_tokens adds up the choices' tokens"

    @completion_tasks()
    def test_cancellation_stops_within_a_token_and_the_slot_answers_as_before(
        self, conformance_models: ConformanceModels, task: str
    ):
        models = conformance_models
        model = models.model_for(task)
        short = models.request(model, task, max_tokens=16)
        long = models.request(model, task, max_tokens=200)

        async def steps(runner: SlotRunner) -> tuple[EngineCall, EngineCall, EngineCall]:
            reference = await runner.call(task, short, fresh=True)
            cancelled = await runner.call(task, long, fresh=True, cancel_after=2)
            # the same slot, its context the engine's own: what the cancelled call left must not leak
            after = await runner.call(task, short, fresh=False)
            return reference, cancelled, after

        reference, cancelled, after = models.on_slot(model, steps)
        assert cancelled.error is None, f"a cancelled call raised {cancelled.error!r}"
        assert cancelled.result is None, "a cancelled call ends by raising trio.Cancelled, not by finishing its answer"
        assert cancelled.chunks_after_cancel <= 1, (
            f"{cancelled.chunks_after_cancel} chunks arrived after the cancel: generation must stop within a token"
        )
        assert after.raised().text() == reference.raised().text()

    def test_tool_call_deltas_come_in_order_and_name_the_call_first(self, conformance_models: ConformanceModels):
        models = conformance_models
        model = models.model_for(CHAT)
        models.require(model, "tools")
        request = models.request(
            model,
            CHAT,
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            parallel_tool_calls=False,
            max_tokens=64,
        )
        call = models.call(model, CHAT, request).raised()
        calls: list[dict[str, Any]] = []
        for chunk in call.chunks:
            assert chunk.index == 0
            for delta in chunk.tool_calls or ():
                if delta.index == len(calls):  # a new call: its first delta names it
                    assert delta.name, "the first delta of a call carries its name"
                    calls.append({"id": delta.id, "name": delta.name, "arguments": delta.arguments})
                    continue
                assert delta.index == len(calls) - 1, f"a delta of call {delta.index} after call {len(calls) - 1} began"
                assert delta.name in (None, calls[-1]["name"]) and delta.id in (None, calls[-1]["id"])
                calls[-1]["arguments"] += delta.arguments
        assert [c["name"] for c in calls] == ["get_weather"], calls
        assert isinstance(json.loads(calls[0]["arguments"]), dict), "the arguments are a JSON object"
        assert call.result.finish_reasons == ["tool_calls"]

    def test_logprobs_spell_the_text_one_entry_per_token(self, conformance_models: ConformanceModels):
        models = conformance_models
        model = models.model_for(CHAT)
        models.require(model, "logprobs")
        call = models.call(model, CHAT, models.request(model, CHAT, max_tokens=8, logprobs=True, top_logprobs=2)).raised()
        tokens = [token for chunk in call.chunks for token in chunk.logprobs or ()]
        assert len(tokens) == call.result.usage.completion_tokens
        assert "".join(token.token for token in tokens) == call.text()
        for token in tokens:
            assert token.logprob <= 1e-4
            assert len(token.top_logprobs) == 2
            assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob

    def test_a_seed_repeats_a_sampled_answer(self, conformance_models: ConformanceModels):
        models = conformance_models
        model = models.model_for(CHAT)
        models.require(model, "seed", "temperature")
        request = models.request(model, CHAT, max_tokens=12, temperature=1.0, seed=1234)
        first = models.call(model, CHAT, request).raised()
        again = models.call(model, CHAT, request).raised()
        assert first.text() == again.text()

    def test_echo_starts_with_the_prompt(self, conformance_models: ConformanceModels):
        models = conformance_models
        model = models.model_for(TEXT)
        models.require(model, "echo")
        call = models.call(model, TEXT, models.request(model, TEXT, max_tokens=4, echo=True)).raised()
        assert call.text().startswith(STORY_PROMPT)
        assert len(call.text()) > len(STORY_PROMPT)

    # --- bad input ----------------------------------------------------------------------

    def bad_inputs(self, models: ConformanceModels) -> list[tuple[str, str, dict[str, Any]]]:
        """(description, task, request) of input an engine must answer or refuse with a 4xx."""
        cases: list[tuple[str, str, dict[str, Any]]] = []
        if models.chat is not None:
            context = models.config(models.chat).context_size or DEFAULT_CONTEXT
            long = " ".join(["word"] * (3 * context))
            cases += [
                ("a message longer than the context", CHAT, {"messages": [{"role": "user", "content": long}], "max_tokens": 4}),
                ("an empty message", CHAT, {"messages": [{"role": "user", "content": ""}], "max_tokens": 4}),
            ]
        if models.text is not None:
            context = models.config(models.text).context_size or DEFAULT_CONTEXT
            cases += [
                ("a prompt longer than the context", TEXT, {"prompt": " ".join(["word"] * (3 * context)), "max_tokens": 4}),
                ("an empty prompt", TEXT, {"prompt": "", "max_tokens": 4}),
            ]
            if "token_prompt" in models.capabilities(models.text):
                cases.append(("a token id beyond the vocabulary", TEXT, {"prompt": [OUT_OF_VOCABULARY], "max_tokens": 4}))
        if models.embedding is not None:
            context = models.config(models.embedding).context_size or DEFAULT_CONTEXT
            cases.append(("an input longer than the context", "embedding", {"input": " ".join(["word"] * (3 * context))}))
            if "token_input" in models.capabilities(models.embedding):
                cases.append(("a token id beyond the vocabulary", "embedding", {"input": [[OUT_OF_VOCABULARY]]}))
        return cases

    def test_bad_input_is_answered_or_refused_with_a_4xx_lllms_error(self, conformance_models: ConformanceModels):
        models = conformance_models
        failures = []
        for description, task, request in self.bad_inputs(models):
            model = {CHAT: models.chat, TEXT: models.text, "embedding": models.embedding}[task]
            error = models.call(model, task, request).error
            if error is None:
                continue
            if not isinstance(error, LllmsError):
                failures.append(f"{description}: {type(error).__name__} ({error}), not an LllmsError")
            elif not 400 <= error.status < 500:
                failures.append(f"{description}: status {error.status} ({error.message})")
            elif "longer than the context" in description and error.code != "context_length_exceeded":
                failures.append(f"{description}: code {error.code!r}, not 'context_length_exceeded'")
        assert not failures, "\n".join(failures)

    # --- embeddings ---------------------------------------------------------------------

    def test_embeddings_are_unit_vectors_in_input_order(self, conformance_models: ConformanceModels):
        models = conformance_models
        model = models.model_for("embedding")
        texts = ["The cat sits on the mat.", "Stock markets fell sharply today.", "The cat sits on the mat."]
        batch = models.call(model, "embedding", {"input": texts}).raised().result
        assert len(batch.embeddings) == 3
        for vector in batch.embeddings:
            assert_unit_length(vector)
        assert cosine(batch.embeddings[0], batch.embeddings[2]) > 0.9999, "the same text, the same vector"
        assert cosine(batch.embeddings[0], batch.embeddings[1]) < 0.99, "different texts, different vectors"
        assert batch.prompt_tokens > 0
        alone = models.call(model, "embedding", {"input": texts[1]}).raised().result
        assert cosine(alone.embeddings[0], batch.embeddings[1]) > 0.999, "a text's vector does not depend on its batch"
        cut = models.call(model, "embedding", {"input": texts[0], "dimensions": 8}).raised().result
        (short,) = cut.embeddings
        assert len(short) == 8
        assert_unit_length(short)
        assert cosine(short, batch.embeddings[0][:8]) > 0.999, "dimensions keeps the leading values, renormalised"

    def test_token_inputs_are_embedded(self, conformance_models: ConformanceModels):
        models = conformance_models
        model = models.model_for("embedding")
        models.require(model, "token_input")
        result = models.call(model, "embedding", {"input": [TOKEN_IDS, TOKEN_IDS[:5]]}).raised().result
        assert len(result.embeddings) == 2
        for vector in result.embeddings:
            assert_unit_length(vector)
        assert result.prompt_tokens >= len(TOKEN_IDS) + 5
