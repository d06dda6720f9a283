"""The library facade: ``async with ModelServer(config) as server:`` and one method per task."""

from __future__ import annotations

import logging
import math
import re
import secrets
import time
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext
from typing import Any, AsyncIterator, TypeVar

import msgspec
import trio

from lllms_core.config import Config, load_config
from lllms_core.context import ContextKey, chat_key, text_key
from lllms_core.engine import ChunkSink, Engine, TaskContext, cosine_rerank
from lllms_core.errors import (
    EngineError,
    InvalidRequestError,
    LllmsError,
    ModelNotFoundError,
    RequestTimeoutError,
)
from lllms_core.images import RequestImages, load_images
from lllms_core.plugins import PluginManager, get_plugin_manager
from lllms_core.pool import ModelPool, open_model_pool
from lllms_core.reasoning import ReasoningSeparator, think_syntax
from lllms_core.samplers import check_request
from lllms_core.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    Choice,
    Completion,
    CompletionChunk,
    CompletionResult,
    DetokenizeRequest,
    DetokenizeResult,
    EmbeddingRequest,
    EmbeddingResult,
    FunctionCall,
    ImageGenerationRequest,
    ImageGenerationResult,
    ImageToTextRequest,
    ImageToTextResult,
    RerankRequest,
    RerankResult,
    SpeechRequest,
    SpeechResult,
    TextCompletionRequest,
    TokenizeRequest,
    TokenizeResult,
    ToolCall,
    TranscriptionRequest,
    TranscriptionResult,
    Usage,
    decoder_for,
)
from lllms_core.store import ModelStore
from lllms_core.tasks import ANY_MODEL_TASKS, tasks_served

log = logging.getLogger("lllms.server")

T = TypeVar("T")


MAX_NESTING = 100
"""How deep a request may nest (objects and arrays, its own fields included): deeper
input is refused rather than recursed into by JSON decoders and grammar builders."""


def validation_error(error: msgspec.ValidationError) -> InvalidRequestError:
    """A 400 from msgspec's message, with ``param`` taken from the JSON path it names."""
    message = str(error)
    param = None
    if "at `$." in message:
        path = message.rsplit("at `$.", 1)[1].rstrip("`")
        param = path
    missing = re.search(r"missing required field `([^`]+)`", message)
    if missing:
        param = f"{param}.{missing.group(1)}" if param else missing.group(1)
    return InvalidRequestError(message, param=param)


def too_deeply_nested() -> InvalidRequestError:
    return InvalidRequestError(f"The request nests objects and arrays more than {MAX_NESTING} levels deep", code="too_deeply_nested")


def parse_request(source: bytes | dict, kind: type[T]) -> T:
    """A request Struct from a JSON body (bytes) or a dict: malformed JSON, wrong values and
    input nested too deeply become 400s."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            request = decoder_for(kind).decode(source)
        else:
            request = msgspec.convert(source, kind)
    except msgspec.ValidationError as error:
        raise validation_error(error) from None
    except msgspec.DecodeError as error:
        raise InvalidRequestError(f"The request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise too_deeply_nested() from None
    if nesting_depth(request) > MAX_NESTING:
        raise too_deeply_nested()
    return request


def nesting_depth(value: Any) -> int:
    """How many levels of Structs, dicts and lists ``value`` nests (without recursing)."""
    deepest = 0
    pending = [(value, 0)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, msgspec.Struct):
            children = [getattr(node, name) for name in node.__struct_fields__]
        elif isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = node
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > MAX_NESTING:
            return deepest
        pending += [(child, depth + 1) for child in children]
    return deepest


def with_defaults(request: Any, defaults: dict[str, Any]) -> Any:
    """``request`` with a model's ``completion_defaults`` where it is silent: request fields
    that are unset, and plugin sampler parameters absent from ``plugin_parameters``."""
    fields = request.__struct_fields__
    unset = {name: value for name, value in defaults.items() if name in fields and getattr(request, name) is None}
    if "plugin_parameters" in fields:
        plugin = {name: value for name, value in defaults.items() if name not in fields}
        if plugin.keys() - request.plugin_parameters.keys():
            unset["plugin_parameters"] = {**plugin, **request.plugin_parameters}
    return msgspec.structs.replace(request, **unset) if unset else request


def leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions of a (nested) exception group."""
    found: list[BaseException] = []
    for exception in group.exceptions:
        found += leaves(exception) if isinstance(exception, BaseExceptionGroup) else [exception]
    return found


class TaskStream:
    """The chunks of one task as they are produced, then its result.

    Iterate it for the chunks (completion text, transcribed text, audio); an error
    while producing them is raised from the iteration. Once exhausted, ``result``
    is what the engine returned.
    """

    def __init__(self, model: str):
        self.model = model
        self.result: Any = None
        self.error: LllmsError | None = None
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        """When the first chunk came."""
        self._send, self._receive = trio.open_memory_channel(math.inf)

    def _push(self, chunk: Any) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self._send.send_nowait(chunk)

    def _finish(self, result: Any) -> None:
        self.result = result
        self._send.close()

    def _fail(self, error: LllmsError) -> None:
        self.error = error
        self._send.close()

    def __aiter__(self) -> "TaskStream":
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self.error is not None:
                raise self.error from None
            raise StopAsyncIteration from None


class CompletionStream(TaskStream):
    """The chunks of one completion as they are generated, then its result.

    Iterate it for :class:`CompletionChunk`s; an error during generation is raised
    from the iteration. Once exhausted, :meth:`completion` has the whole answer.
    """

    def __init__(self, model: str, choices: int, fingerprint: str | None):
        super().__init__(model)
        self.id = f"cmpl-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.system_fingerprint = fingerprint
        self.choices = [Choice(index=index) for index in range(choices)]
        self.usage = Usage()

    def _push(self, chunk: CompletionChunk) -> None:
        choice = self.choices[chunk.index]
        if chunk.logprobs:
            if choice.logprobs is None:
                choice.logprobs_offset = len(choice.text)
            choice.logprobs = (choice.logprobs or []) + chunk.logprobs
        choice.text += chunk.text
        choice.reasoning += chunk.reasoning
        for delta in chunk.tool_calls or ():
            if delta.index >= len(choice.tool_calls):
                choice.tool_calls.append(
                    ToolCall(id=delta.id or f"call_{secrets.token_hex(8)}", function=FunctionCall(name=delta.name or "", arguments=""))
                )
            call = choice.tool_calls[delta.index]
            call.function.arguments += delta.arguments
        super()._push(chunk)

    def _finish(self, result: CompletionResult) -> None:
        for choice, reason in zip(self.choices, result.finish_reasons):
            choice.finish_reason = reason
        for choice, stop in zip(self.choices, result.stop_sequences):
            choice.stop_sequence = stop
        self.usage = result.usage
        super()._finish(result)

    def completion(self) -> Completion:
        return Completion(
            id=self.id,
            model=self.model,
            created=self.created,
            choices=self.choices,
            usage=self.usage,
            system_fingerprint=self.system_fingerprint,
        )


class SpeechAudio(msgspec.Struct, kw_only=True):
    """Synthesized speech, encoded: what :meth:`ModelServer.text_to_speech` returns."""

    audio: bytes
    media_type: str
    result: SpeechResult


class ModelCalls:
    """The models of a server, as an engine's task may call them (``TaskContext.models``).

    The methods are the :class:`ModelServer`'s. A request made through it is part of the
    task that made it: it waits for a slot of its model like any other request, but not
    for the server's concurrency limit nor against its queue limit, which the task passed
    already (waiting for the gate while holding a slot could wait forever). It is
    cancelled with the task. A model may not call itself, directly or through others.
    """

    def __init__(self, server: "ModelServer", callers: tuple[str, ...]):
        self._server = server
        self.callers = callers
        """The models whose tasks lead to this one, outermost first."""

    def stream_chat_completion(self, request: ChatCompletionRequest | dict):
        return self._server.stream_chat_completion(request, _callers=self.callers)

    def stream_text_completion(self, request: TextCompletionRequest | dict):
        return self._server.stream_text_completion(request, _callers=self.callers)

    async def chat_completion(self, request: ChatCompletionRequest | dict) -> Completion:
        return await self._server.chat_completion(request, _callers=self.callers)

    async def text_completion(self, request: TextCompletionRequest | dict) -> Completion:
        return await self._server.text_completion(request, _callers=self.callers)

    async def embedding(self, request: EmbeddingRequest | dict) -> EmbeddingResult:
        return await self._server.embedding(request, _callers=self.callers)

    async def speech_to_text(self, request: TranscriptionRequest | dict) -> TranscriptionResult:
        return await self._server.speech_to_text(request, _callers=self.callers)

    def stream_speech_to_text(self, request: TranscriptionRequest | dict):
        return self._server.stream_speech_to_text(request, _callers=self.callers)

    async def text_to_speech(self, request: SpeechRequest | dict) -> SpeechAudio:
        return await self._server.text_to_speech(request, _callers=self.callers)

    def stream_text_to_speech(self, request: SpeechRequest | dict):
        return self._server.stream_text_to_speech(request, _callers=self.callers)

    async def image_to_text(self, request: ImageToTextRequest | dict) -> ImageToTextResult:
        return await self._server.image_to_text(request, _callers=self.callers)


class ModelServer:
    """Models by id, served from a pool of instances.

    ``config`` is a :class:`Config`, a dict or a TOML path. ``wait_ready``: entering
    waits until ``min_instances`` are loaded and ``blocking`` models are prepared.
    """

    def __init__(self, config: Config | dict | str | None = None, *, plugins: PluginManager | None = None, wait_ready: bool = True):
        self.plugins = plugins or get_plugin_manager()
        self.config = load_config(config, self.plugins)
        self.engines: dict[str, Engine] = {}
        self.store = ModelStore(self.config, self.engines)
        for model in self.config.models.values():
            if model.engine not in self.engines:
                self.engines[model.engine] = self.plugins.engines[model.engine](self.store, self.plugins.samplers)
        for model in self.config.models.values():
            self.engines[model.engine].check_model(model, self.config)
        self.wait_ready = wait_ready
        self.pool: ModelPool | None = None
        self.fingerprints = {
            model_id: "fp_" + secrets.token_hex(5) for model_id in self.config.models
        }
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> "ModelServer":
        self._stack = AsyncExitStack()
        try:
            self.pool = await self._stack.enter_async_context(open_model_pool(self.config, self.engines, self.store))
            # generations run here, so a consumer's exceptions never pass through a nursery of ours
            self._generations = await self._stack.enter_async_context(trio.open_nursery())
            self._stack.callback(self._generations.cancel_scope.cancel)
            if self.wait_ready:
                await self.pool.wait_ready()
        except BaseException as error:
            await self.__aexit__(type(error), error, error.__traceback__)
            raise
        return self

    async def __aexit__(self, *exc_info) -> bool | None:
        stack, self._stack = self._stack, None
        assert stack is not None
        try:
            return await stack.__aexit__(*exc_info)
        except BaseExceptionGroup as group:
            # the caller's own exception, wrapped by the pool's nursery on its way out: it is
            # what the caller raised (an LllmsError from a request), so it leaves as it came
            error = exc_info[1]
            if error is not None and all(leaf is error for leaf in leaves(group)):
                raise error from None
            raise

    # --- facts ----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.pool is not None and self.pool.ready

    def status(self) -> dict[str, Any]:
        assert self.pool is not None
        store = self.store.status()
        pool = self.pool.status()
        failures = self.pool.failures()
        return {
            "ready": self.ready,
            "processing": pool["processing"],
            "queued": pool["queued"],
            "concurrency": pool["concurrency"],
            "memory": pool["memory"],
            "models": {
                model.id: {
                    "engine": model.engine,
                    "task": model.task,
                    **store.get(model.id, {}),
                    "start_error": failures.get(model.id),
                    **({"prompt_cache": pool["prompt_caches"][model.id]} if model.id in pool["prompt_caches"] else {}),
                }
                for model in self.config.models.values()
            },
            "instances": pool["instances"],
        }

    async def report(self) -> dict[str, Any]:
        """The status report as fresh as it can be had (what ``GET /`` answers): a server
        whose models run elsewhere asks them here; this one has it at hand."""
        return self.status()

    # --- requests -------------------------------------------------------------
    # ``_callers``: the models whose tasks make this request (see ModelCalls); empty for a client's.

    def _resolve(self, task_name: str, request: Any, callers: tuple[str, ...] = ()):
        task = self.plugins.tasks[task_name]
        if isinstance(request, dict):
            request = parse_request(request, task.request)
        model = self.config.models.get(request.model)
        if model is None:
            raise ModelNotFoundError(f"The model {request.model!r} does not exist", param="model")
        if model.id in callers:
            raise InvalidRequestError(
                f"model {model.id!r} calls itself (through {' → '.join(callers)})", param="model"
            )
        if task_name not in tasks_served(model.task):
            raise InvalidRequestError(
                f"model {model.id!r} is a {model.task} model; it does not serve {task_name}", param="model"
            )
        if model.completion_defaults:
            request = with_defaults(request, model.completion_defaults)
        engine = self.engines[model.engine]
        if task_name in ANY_MODEL_TASKS and not engine.implements(task.method):
            raise engine.unsupported("model", task_name.replace("-", " "))
        if task_name == "rerank" and model.task == "rerank" and not engine.implements("rerank"):
            raise engine.unsupported("model", "reranking")
        if isinstance(request, TokenizeRequest) and (request.content is None) == (request.messages is None):
            raise InvalidRequestError("give either `content` or `messages`", param="content")
        check_request(engine, task, self.plugins.samplers, request, model.id)
        return model, engine, task, request

    async def _images(self, task, request: Any) -> RequestImages:
        """The request's images, fetched and decoded before it takes a slot (a bad one is a 400)."""
        if task.images is None:
            return RequestImages()
        sources = task.images(request)
        return await load_images(sources, self.config.images) if sources else RequestImages()

    def _deadline(self):
        timeout = self.config.server.request_timeout
        return trio.fail_after(timeout) if timeout else nullcontext()

    @staticmethod
    async def _check(engine: Engine, model, request: Any) -> Any:
        """The engine's check of a request (in a thread), before it is queued."""
        if type(engine).check_request is Engine.check_request:
            return None
        return await trio.to_thread.run_sync(engine.check_request, model, request)

    def _timed_out(self) -> RequestTimeoutError:
        return RequestTimeoutError(f"the request took longer than {self.config.server.request_timeout} s")

    def _task_context(
        self, slot, callers: tuple[str, ...], audio=None, images: RequestImages | None = None, checked: Any = None
    ) -> TaskContext:
        context = slot.task_context()
        models = ModelCalls(self, (*callers, context.model.id))
        return msgspec.structs.replace(
            context, models=models, audio=audio, images=images or RequestImages(), checked=checked
        )

    async def _decoded(self, engine: Engine, request: TranscriptionRequest):
        """The request's audio, decoded for the engine (before it waits for a slot)."""
        from lllms_core import audio

        return await audio.decode(request.audio, engine.audio_sample_rate, self.config.audio)

    @asynccontextmanager
    async def _open_stream(self, lease, stream: TaskStream, engine: Engine, work) -> AsyncIterator[TaskStream]:
        """Run ``await work(slot)`` on the lease's slot in a task of the server, into ``stream``:
        its result finishes the stream, its error fails it. Leaving the block cancels it."""
        scope = trio.CancelScope()
        self._generations.start_soon(self._produce, lease, stream, engine, work, scope)
        try:
            yield stream
        finally:
            scope.cancel()  # the consumer is gone: stop producing; a busy slot frees itself
            lease.leave_queue()

    async def _produce(self, lease, stream: TaskStream, engine: Engine, work, scope: trio.CancelScope) -> None:
        with scope:
            try:
                with self._deadline():
                    async with lease as slot:
                        result = await work(slot)
                stream._finish(result)
            except trio.TooSlowError:
                stream._fail(self._timed_out())
            except LllmsError as error:
                stream._fail(error)
            except Exception as error:
                log.exception("engine %r failed", engine.name)
                stream._fail(EngineError(f"engine {engine.name!r} failed: {type(error).__name__}"))
            finally:
                lease.withdraw()

    @asynccontextmanager
    async def _stream(self, task_name: str, request: Any, key_of, callers: tuple[str, ...]) -> AsyncIterator[CompletionStream]:
        model, engine, task, request = self._resolve(task_name, request, callers)
        checked = await self._check(engine, model, request)
        assert self.pool is not None
        images = await self._images(task, request)
        lease = self.pool.acquire(model.id, key_of(request), nested=bool(callers))
        stream = CompletionStream(model.id, request.choices, self.fingerprints[model.id])

        async def generate(slot):
            slot.context_key = ()  # unknown until the task ends well
            keep_alive(slot, request)
            push = stream._push
            separator = self._reasoning_separator(slot, request)
            if separator is not None:
                push = lambda chunk: stream._push(separator.split(chunk))  # noqa: E731
            context = self._task_context(slot, callers, images=images, checked=checked)
            result = await getattr(engine, task.method)(context, request, ChunkSink(push))
            for chunk in separator.flush() if separator is not None else ():
                stream._push(chunk)
            slot.fresh = False
            slot.context_key = self._key_after(request, stream)
            return result

        async with self._open_stream(lease, stream, engine, generate) as opened:
            yield opened

    @staticmethod
    def _reasoning_separator(slot, request: Any) -> ReasoningSeparator | None:
        """For a chat with a model whose template thinks: what moves the thinking into ``reasoning``."""
        if not isinstance(request, ChatCompletionRequest):
            return None
        syntax = think_syntax(slot.instance.engine_instance.chat_template)
        return ReasoningSeparator(syntax, request.choices) if syntax is not None else None

    @staticmethod
    def _key_after(request: Any, stream: CompletionStream) -> ContextKey:
        choice = stream.choices[0]
        if isinstance(request, ChatCompletionRequest):
            reply = AssistantMessage(
                content=choice.text or None, tool_calls=choice.tool_calls or msgspec.UNSET
            )
            return chat_key([*request.messages, reply])
        prompt = request.prompts[0]
        return text_key(prompt + choice.text) if isinstance(prompt, str) else ()

    def stream_chat_completion(self, request: ChatCompletionRequest | dict, *, _callers: tuple[str, ...] = ()):
        """``async with server.stream_chat_completion(request) as stream: async for chunk in stream``."""
        return self._stream("chat-completion", request, lambda r: chat_key(r.messages[:-1]), _callers)

    def stream_text_completion(self, request: TextCompletionRequest | dict, *, _callers: tuple[str, ...] = ()):
        """One prompt per call (the HTTP API runs a list of prompts as one call each)."""

        def key(r: TextCompletionRequest) -> ContextKey:
            prompts = r.prompts
            if len(prompts) != 1:
                raise InvalidRequestError(
                    f"`prompt` must be one prompt here, not {len(prompts)}: run one completion per prompt", param="prompt"
                )
            return text_key(prompts[0]) if isinstance(prompts[0], str) else ()

        return self._stream("text-completion", request, key, _callers)

    async def chat_completion(self, request: ChatCompletionRequest | dict, *, _callers: tuple[str, ...] = ()) -> Completion:
        async with self.stream_chat_completion(request, _callers=_callers) as stream:
            async for _ in stream:
                pass
        return stream.completion()

    async def text_completion(self, request: TextCompletionRequest | dict, *, _callers: tuple[str, ...] = ()) -> Completion:
        async with self.stream_text_completion(request, _callers=_callers) as stream:
            async for _ in stream:
                pass
        return stream.completion()

    async def _run(self, task_name: str, request: Any, callers: tuple[str, ...] = (), method: str | None = None):
        """Run a task that does not stream in a slot of its model; ``method``: another engine
        method than the task's (the core's own way of doing the task)."""
        model, engine, task, request = self._resolve(task_name, request, callers)
        checked = await self._check(engine, model, request)
        assert self.pool is not None
        run = getattr(self, method) if method else getattr(engine, task.method)
        images = await self._images(task, request)
        audio = await self._decoded(engine, request) if task_name == "speech-to-text" else None
        try:
            with self._deadline():
                async with self.pool.acquire(model.id, nested=bool(callers)) as slot:
                    keep_alive(slot, request)
                    return await run(self._task_context(slot, callers, audio, images, checked), request)
        except trio.TooSlowError:
            raise self._timed_out() from None
        except LllmsError:
            raise
        except Exception as error:
            log.exception("engine %r failed", engine.name)
            raise EngineError(f"engine {engine.name!r} failed: {type(error).__name__}") from None

    async def embedding(self, request: EmbeddingRequest | dict, *, _callers: tuple[str, ...] = ()) -> EmbeddingResult:
        return await self._run("embedding", request, _callers)

    async def speech_to_text(
        self, request: TranscriptionRequest | dict, *, _callers: tuple[str, ...] = ()
    ) -> TranscriptionResult:
        """Transcribe ``request.audio`` (or translate it to English, ``task="translate"``)."""
        return await self._run("speech-to-text", request, _callers)

    @asynccontextmanager
    async def stream_speech_to_text(
        self, request: TranscriptionRequest | dict, *, _callers: tuple[str, ...] = ()
    ) -> AsyncIterator[TaskStream]:
        """``async with server.stream_speech_to_text(request) as stream``: the text as it is
        recognised (:class:`CompletionChunk` deltas), then ``stream.result``, the
        :class:`TranscriptionResult`. Audio that cannot be decoded is refused on entering."""
        model, engine, task, request = self._resolve("speech-to-text", request, _callers)
        assert self.pool is not None
        audio = await self._decoded(engine, request)
        lease = self.pool.acquire(model.id, nested=bool(_callers))
        stream = TaskStream(model.id)

        async def transcribe(slot):
            context = self._task_context(slot, _callers, audio)
            return await engine.stream_speech_to_text(context, request, ChunkSink(stream._push))

        async with self._open_stream(lease, stream, engine, transcribe) as opened:
            yield opened

    def stream_text_to_speech(self, request: SpeechRequest | dict, *, _callers: tuple[str, ...] = ()):
        """``async with server.stream_text_to_speech(request) as stream``: the audio as it is
        synthesized (:class:`AudioChunk`s of 16-bit PCM; :class:`lllms_core.audio.StreamEncoder`
        encodes them), then ``stream.result``, the :class:`SpeechResult`."""
        model, engine, task, request = self._resolve("text-to-speech", request, _callers)
        assert self.pool is not None
        lease = self.pool.acquire(model.id, nested=bool(_callers))
        stream = TaskStream(model.id)

        async def speak(slot):
            return await engine.text_to_speech(self._task_context(slot, _callers), request, ChunkSink(stream._push))

        return self._open_stream(lease, stream, engine, speak)

    async def text_to_speech(self, request: SpeechRequest | dict, *, _callers: tuple[str, ...] = ()) -> SpeechAudio:
        """Speak ``request.input``: the whole audio, encoded in ``request.response_format``."""
        from lllms_core.audio import MEDIA_TYPES, StreamEncoder

        if isinstance(request, dict):
            request = self._resolve("text-to-speech", request, _callers)[3]
        encoder = StreamEncoder(request.response_format)
        pieces = []
        async with self.stream_text_to_speech(request, _callers=_callers) as stream:
            async for chunk in stream:
                pieces.append(await encoder.encode(chunk))
        pieces.append(await encoder.finish())
        return SpeechAudio(audio=b"".join(pieces), media_type=MEDIA_TYPES[request.response_format], result=stream.result)

    async def image_to_text(self, request: ImageToTextRequest | dict, *, _callers: tuple[str, ...] = ()) -> ImageToTextResult:
        """Caption or read an image (``prompt``: what to ask, for models that take one)."""
        return await self._run("image-to-text", request, _callers)

    async def image_generation(self, request: ImageGenerationRequest | dict) -> ImageGenerationResult:
        """Generate images from a prompt, or edit ``request.image`` (Pillow images back)."""
        return await self._run("image-generation", request)

    async def rerank(self, request: RerankRequest | dict) -> RerankResult:
        """Relevance scores of documents for a query: a ``rerank`` model's own (a cross-encoder),
        or, for an ``embedding`` model, the cosine similarity of their embeddings."""
        model = self.config.models.get(request["model"] if isinstance(request, dict) else request.model)
        if model is not None and model.task == "embedding":
            return await self._run("rerank", request, method="_cosine_rerank")
        return await self._run("rerank", request)

    async def _cosine_rerank(self, context: TaskContext, request: RerankRequest) -> RerankResult:
        return await cosine_rerank(self.engines[context.model.engine], context, request)

    async def tokenize(self, request: TokenizeRequest | dict) -> TokenizeResult:
        """Token ids of a text, or of a chat as the model's template renders it."""
        return await self._run("tokenize", request)

    async def detokenize(self, request: DetokenizeRequest | dict) -> DetokenizeResult:
        return await self._run("detokenize", request)


def keep_alive(slot, request: Any) -> None:
    """Apply a request's ``keep_alive`` to the instance that serves it."""
    seconds = getattr(request, "keep_alive", None)
    if seconds is not None:
        slot.instance.keep_alive = math.inf if seconds < 0 else seconds
