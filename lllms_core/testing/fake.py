"""A deterministic fake engine, ``fake``: for tests of the pool, the HTTP API and the
plugin machinery, not of model behaviour. It uses only :mod:`lllms_core.plugin_api`.

Chat: answers ``reply`` if configured, else ``"You said: <last user text>"`` (and
``[image <width>x<height> <format>]`` for each image of the last message), one word per
token; text completion: ``reply`` or ``"and then the story goes on"``. With tools it calls
the first tool (or the one ``tool_choice`` names) with ``{"echo": <last user text>}``.
Speech: a tone of 0.1 s per word of the input, one chunk per word, in the voices ``low``
(the default) and ``high``. Each slot remembers the words of its context, so cached tokens
show context reuse. ``EVENTS`` records loads, disposals and tasks for tests to inspect.

Register it per test with ``lllms_core.testing.plugin_manager(fake)`` (this module is the
plugin), or install the ``lllms-fake-engine`` distribution of lllms' tests, which declares
it as the entry point ``fake``. Model options: ``slots``, ``load_delay``, ``token_delay``
(seconds per token, slept in the worker thread), ``fail_loads``, ``reply``, ``chat_template``,
``memory_mib`` and ``dispose_delay``.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time

import msgspec
import trio

from lllms_core.plugin_api import (
    AudioChunk,
    CompletionChunk,
    CompletionResult,
    DetokenizeResult,
    EmbeddingResult,
    Engine,
    EngineInstance,
    ImageGenerationResult,
    ImageToTextResult,
    ImageUrlPart,
    InvalidRequestError,
    ModelLoadError,
    RerankResult,
    SpeechResult,
    StopStringFilter,
    TextCompletionRequest,
    ThinkingBudget,
    TokenLogprob,
    TokenizeResult,
    ToolCallDelta,
    TopLogprob,
    TranscriptionResult,
    TranscriptionSegment,
    Usage,
    hookimpl,
    message_text,
    normalize_embedding,
)

EVENTS: list[tuple] = []
VOCABULARY: dict[str, int] = {}


def _top_logprobs(request) -> int | None:
    """None: no logprobs; else how many alternatives per token (chat: ``logprobs`` and
    ``top_logprobs``; text: the legacy ``logprobs`` count)."""
    if isinstance(request, TextCompletionRequest):
        return request.logprobs
    return (request.top_logprobs or 0) if request.logprobs or request.top_logprobs else None


class FakeOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    slots: int = 1
    load_delay: float = 0.0
    token_delay: float = 0.0
    fail_loads: int = 0
    """Fail this many loads of the model before loading succeeds."""
    reply: str | None = None
    chat_template: str | None = None
    """A chat template, read by the core only for whether the model thinks (``<think>``)."""
    memory_mib: int = 0
    """Memory an instance reports holding (for the pool's memory budget)."""
    dispose_delay: float = 0.0
    """Seconds a disposal takes (an event ``("disposed", model)`` marks its end)."""


class FakeEngine(Engine):
    name = "fake"
    tasks = frozenset(
        {"chat-completion", "text-completion", "embedding", "speech-to-text", "text-to-speech", "rerank", "image-generation",
         "image-to-text"}  # fmt: skip
    )
    default_task = "chat-completion"
    options = FakeOptions
    capabilities = frozenset(
        {"temperature", "top_p", "seed", "n", "logprobs", "tools", "echo", "pooling", "reasoning_budget", "vision",
         "image_edit", "translate"}  # fmt: skip
    )
    needs_model_file = False

    def gpu_available(self):
        return True  # pretend, so that the pool's GPU rules can be tested

    def memory_estimate(self, model, location, device):
        return model.options.memory_mib * 1024 * 1024

    async def create_instance(self, model, prepared, device):
        options: FakeOptions = model.options
        await trio.sleep(options.load_delay)
        if sum(1 for event in EVENTS if event[:2] == ("load-failed", model.id)) < options.fail_loads:
            EVENTS.append(("load-failed", model.id))
            raise ModelLoadError(f"fake model {model.id!r} refuses to load")
        instance = EngineInstance(slots=options.slots, limiter=trio.CapacityLimiter(options.slots),
                                  memory_bytes=options.memory_mib * 1024 * 1024)
        instance.model_id = model.id
        instance.dispose_delay = options.dispose_delay
        instance.gpu = device.gpu
        instance.chat_template = options.chat_template
        EVENTS.append(("load", model.id, "gpu" if device.gpu else "cpu"))
        return instance

    async def dispose_instance(self, instance):
        EVENTS.append(("dispose", instance.model_id))
        if instance.dispose_delay:
            await trio.sleep(instance.dispose_delay)
            EVENTS.append(("disposed", instance.model_id))

    async def preload(self, context):
        model = context.model
        text = " ".join(m.content for m in model.initial_messages) if model.initial_messages else model.prefix
        context.instance.slot_states[context.slot] = text.split()

    def _generate(self, context, words_in: list[str], answer: str, request, sink, index: int) -> tuple[str, Usage]:
        """Runs in a worker thread, like a real engine's generation loop."""
        options: FakeOptions = context.model.options
        state = context.instance.slot_states[context.slot] or []
        cached = 0
        for old, new in zip(state, words_in):
            if old != new:
                break
            cached += 1
        stop = StopStringFilter(request.stop_list)
        limit = request.token_limit
        top = _top_logprobs(request)
        generated: list[str] = []
        reason = "stop"
        words = answer.split()
        thinking = ThinkingBudget.for_request(options.chat_template, request)
        position = 0
        while position < len(words):
            word = words[position]
            if limit is not None and len(generated) >= limit:
                reason = "length"
                break
            if thinking is not None and thinking.exhausted:
                # out of budget: close the block, and go on with the answer after the thinking
                word = thinking.closing.strip()
                thinking.closed()
                if "</think>" in words[position:]:
                    position = words.index("</think>", position)
            if options.token_delay:
                time.sleep(options.token_delay)
            token = word if not generated else " " + word
            if thinking is not None:
                thinking.advance(token)
            position += 1
            text, stopped = stop.push(token)
            logprobs = None
            if top is not None:
                alternatives = [token] + [f"{token}~{rank}" for rank in range(1, top)]
                logprobs = [
                    TokenLogprob(token=token, logprob=-0.5, bytes=list(token.encode()), top_logprobs=[
                        TopLogprob(token=other, logprob=-0.5 * (rank + 1), bytes=list(other.encode()))
                        for rank, other in enumerate(alternatives[:top])
                    ])
                ]  # fmt: skip
            if text or logprobs:
                sink.send_from_thread(CompletionChunk(index=index, text=text, logprobs=logprobs))
            generated.append(word)
            if stopped:
                break
        else:
            rest = stop.flush()
            if rest:
                sink.send_from_thread(CompletionChunk(index=index, text=rest))
        self.stops_matched[index] = stop.matched
        if index == 0:
            context.instance.slot_states[context.slot] = words_in + generated
        return reason, Usage(prompt_tokens=len(words_in), completion_tokens=len(generated), cached_tokens=cached)

    async def chat_completion(self, context, request, sink):
        EVENTS.append(("task", context.model.id, context.slot, context.fresh))
        words_in = " ".join(message_text(m) for m in request.messages).split()
        if request.tools and request.tool_choice != "none":
            tool = request.tools[0].function
            if request.tool_choice not in (None, "auto", "required"):
                tool = next(t.function for t in request.tools if t.function.name == request.tool_choice.function.name)
            arguments = json.dumps({"echo": message_text(request.messages[-1])})
            await sink.send(CompletionChunk(tool_calls=[ToolCallDelta(index=0, id="call_fake0", name=tool.name)]))
            await sink.send(CompletionChunk(tool_calls=[ToolCallDelta(index=0, arguments=arguments)]))
            return CompletionResult(
                finish_reasons=["tool_calls"], usage=Usage(prompt_tokens=len(words_in), completion_tokens=5)
            )
        last = request.messages[-1]
        answer = context.model.options.reply or "You said: " + message_text(last)
        if isinstance(last.content, list):
            for part in last.content:
                if isinstance(part, ImageUrlPart):
                    image = context.image(part.image_url.url)
                    answer += f" [image {image.width}x{image.height} {image.format}]"
        return await self._complete(context, words_in, answer, request, sink)

    async def text_completion(self, context, request, sink):
        EVENTS.append(("task", context.model.id, context.slot, context.fresh))
        prompt = request.prompts[0]
        words_in = prompt.split() if isinstance(prompt, str) else [str(t) for t in prompt]
        if request.echo and isinstance(prompt, str):
            for index in range(request.choices):
                await sink.send(CompletionChunk(index=index, text=prompt))
        answer = context.model.options.reply or "and then the story goes on"
        return await self._complete(context, words_in, answer, request, sink)

    async def _complete(self, context, words_in, answer, request, sink):
        reasons, usage = [], Usage()
        self.stops_matched = {}
        for index in range(request.choices):
            reason, choice_usage = await trio.to_thread.run_sync(
                self._generate, context, words_in, answer, request, sink, index, limiter=context.instance.limiter
            )
            reasons.append(reason)
            usage = Usage(
                prompt_tokens=choice_usage.prompt_tokens,
                completion_tokens=usage.completion_tokens + choice_usage.completion_tokens,
                cached_tokens=choice_usage.cached_tokens,
            ) if index else choice_usage
        stops = [self.stops_matched.get(index) for index in range(request.choices)]
        return CompletionResult(finish_reasons=reasons, usage=usage, stop_sequences=stops)

    async def embedding(self, context, request):
        vectors = []
        tokens = 0
        for item in request.inputs:
            text = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += len(text.split())
            digest = hashlib.sha256(text.lower().encode()).digest()
            vectors.append(normalize_embedding([b - 127.5 for b in digest[:16]], request.dimensions))
        return EmbeddingResult(embeddings=vectors, prompt_tokens=tokens)

    async def rerank(self, context, request):
        """Scores: the share of the query's words a document has (deterministic, not a model)."""
        query = set(request.query.lower().split())
        scores = [len(query & set(text.lower().split())) / max(1, len(query)) for text in request.texts]
        return RerankResult(scores=scores, prompt_tokens=sum(len(text.split()) for text in [request.query, *request.texts]))

    async def tokenize(self, context, request):
        """One token per word: its index in a vocabulary that grows as words are seen."""
        text = request.content if request.content is not None else " ".join(message_text(m) for m in request.messages)
        words = text.split()
        tokens = [VOCABULARY.setdefault(word, len(VOCABULARY)) for word in words]
        return TokenizeResult(tokens=tokens, pieces=words if request.with_pieces else None)

    async def detokenize(self, context, request):
        words = {token: word for word, token in VOCABULARY.items()}
        unknown = [token for token in request.tokens if token not in words]
        if unknown:
            raise InvalidRequestError(f"unknown token id {unknown[0]}", param="tokens")
        return DetokenizeResult(content=" ".join(words[token] for token in request.tokens))

    async def speech_to_text(self, context, request):
        text = f"fake transcription of {len(request.audio)} bytes"
        return TranscriptionResult(
            text=text,
            language=request.language or "en",
            duration=1.5,
            segments=[TranscriptionSegment(id=0, start=0.0, end=1.5, text=text)],
        )

    async def image_generation(self, context, request):
        """Plain images of one colour (from the prompt and seed), ``steps`` steps of
        ``token_delay`` each; an edit averages that colour with the input image."""
        import PIL.Image

        options: FakeOptions = context.model.options
        width, height = request.dimensions or (32, 32)
        steps = request.steps or 4
        seed = request.seed if request.seed is not None else 0

        def run():
            images = []
            for number in range(request.count):
                for step in range(steps):
                    trio.from_thread.check_cancelled()
                    time.sleep(options.token_delay)
                    context.progress.update(number * steps + step + 1, request.count * steps)
                colour = tuple(hashlib.sha256(f"{request.prompt}|{seed + number}".encode()).digest()[:3])
                image = PIL.Image.new("RGB", (width, height), colour)
                if request.image:
                    source = context.image(request.image[0]).pixels.resize((width, height))
                    image = PIL.Image.blend(image, source, 0.5)
                images.append(image)
            return images

        EVENTS.append(("task", context.model.id, context.slot, context.fresh))
        images = await trio.to_thread.run_sync(run, limiter=context.instance.limiter)
        return ImageGenerationResult(images=images, seed=seed)


    async def image_to_text(self, context, request):
        return ImageToTextResult(text=f"a picture of {len(request.image)} bytes")

    VOICES = {"low": 220.0, "high": 880.0}
    SPEECH_RATE = 16000

    async def text_to_speech(self, context, request, sink):
        voice = request.voice_name or "low"
        if voice not in self.VOICES:
            raise InvalidRequestError(f"unknown voice {voice!r} (voices: low, high)", param="voice")
        words = request.input.split()
        samples = 0
        for word in words:
            frames = int(self.SPEECH_RATE * 0.1 / request.speed)
            tone = (int(8000 * math.sin(2 * math.pi * self.VOICES[voice] * (samples + n) / self.SPEECH_RATE)) for n in range(frames))
            await sink.send(AudioChunk(pcm=struct.pack(f"<{frames}h", *tone), sample_rate=self.SPEECH_RATE))
            samples += frames
            if context.model.options.token_delay:
                await trio.sleep(context.model.options.token_delay)
        return SpeechResult(sample_rate=self.SPEECH_RATE, samples=samples, input_tokens=len(words), output_tokens=len(words))


@hookimpl
def register_engines(register):
    register(FakeEngine)
