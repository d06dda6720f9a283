"""The engine protocol: what an engine plugin implements.

An engine prepares a model (download, verify, convert), creates and disposes
instances, and runs tasks. Every blocking call of an engine runs in a thread
bounded by its instance's ``limiter``. An instance offers ``slots`` sequences
that can be processed at once; each slot keeps its own context state.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import msgspec
import trio

from lllms_core.chat.markers import StopStringFilter  # noqa: F401  (engines imported it from here)
from lllms_core.errors import InvalidRequestError, UnsupportedParameterError
from lllms_core.images import Image, RequestImages

if TYPE_CHECKING:
    from lllms_core.config import Config, ModelConfig
    from lllms_core.samplers import Sampler
    from lllms_core.schemas import (
        ChatCompletionRequest,
        CompletionChunk,
        CompletionResult,
        DetokenizeRequest,
        DetokenizeResult,
        EmbeddingRequest,
        EmbeddingResult,
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
        TranscriptionRequest,
        TranscriptionResult,
    )
    from lllms_core.store import ModelStore


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of an engine that has none of its own."""


class Device(msgspec.Struct, kw_only=True):
    """Where the pool decided an instance runs."""

    gpu: bool
    """Whether this instance holds the GPU."""
    name: str | None = None
    """A backend or device name from the model's ``device.gpu`` string, if any."""
    gpu_layers: int | None = None
    cpu_threads: int | None = None
    mem_lock: bool = False
    memory_budget: int | None = None
    """The server's memory budget in bytes: an engine sizes what it chooses by itself (KV
    caches, sequences) within it. None: the machine's default budget."""


class EngineInstance:
    """A loaded model. Engines subclass it or use it as it is.

    ``slots``: how many sequences this instance processes at once (each a slot
    of the pool with its own context state). ``limiter`` bounds the threads that
    run its blocking calls. ``info()`` adds engine facts to the status report.
    ``chat_template``: the Jinja chat template the instance renders chats with, if any;
    the core reads from it whether the model thinks (see :mod:`lllms_core.reasoning`).
    """

    chat_template: str | None = None
    memory_bytes: int | None = None
    """Host memory this instance holds (weights, KV caches, buffers), as far as the engine
    knows; the pool's memory budget counts it. None: the engine's ``memory_estimate``."""

    def __init__(self, *, slots: int = 1, limiter: trio.CapacityLimiter | None = None, **attributes: Any):
        self.slots = slots
        self.limiter = limiter or trio.CapacityLimiter(1)
        self.slot_states: list[Any] = [None] * slots
        """Per-slot context state, owned by the engine (tokens, a chat session...)."""
        for name, value in attributes.items():
            setattr(self, name, value)

    def info(self) -> dict[str, Any]:
        return {}


class Progress:
    """How far a long task has come (the steps of an image generation), shown in the
    status report while it runs. An engine calls :meth:`update` from any thread."""

    def __init__(self) -> None:
        self.done = 0
        self.total: int | None = None
        self.unit = "steps"

    def update(self, done: int, total: int | None = None, unit: str = "steps") -> None:
        self.done, self.total, self.unit = done, total, unit

    def report(self) -> dict[str, Any] | None:
        if self.total is None and not self.done:
            return None
        return {"done": self.done, "total": self.total, "unit": self.unit}


class TaskContext(msgspec.Struct, kw_only=True):
    """What an engine gets with each task besides the request."""

    instance: EngineInstance
    slot: int
    """Index of the slot (sequence) the pool assigned to this request."""
    model: Any
    """The model's ModelConfig."""
    fresh: bool = False
    """True when the pool reset this slot: its previous context belongs to another conversation."""
    images: RequestImages = msgspec.field(default_factory=RequestImages)
    """The request's images, fetched and decoded by the core (see :meth:`image`)."""
    progress: Progress = msgspec.field(default_factory=Progress)
    """Where a long task reports how far it has come (shown in the slot's status)."""
    prompt_cache: Any = None
    """The model's :class:`lllms_core.prompt_cache.PromptCache` (None: no cache): an engine
    saves a slot's state there before overwriting it with another conversation, and
    restores a saved state whose tokens begin the request's prompt."""
    previous_key: tuple[str, ...] = ()
    """The pool's context key of what the slot held before this request: an engine that
    saves that state files it under this key (the pool routes by it)."""
    audio: Any = None
    """Speech to text: the request's audio, decoded by the core (a
    :class:`lllms_core.audio.DecodedAudio`: mono float32 at the engine's ``audio_sample_rate``)."""
    models: Any = None
    """The other models of the same server (a :class:`lllms_core.server.ModelCalls`), for an
    engine composed from them: ``await context.models.speech_to_text(...)``,
    ``async with context.models.stream_chat_completion(...) as stream``. Its requests are part
    of this task: they are cancelled with it and wait for their model's slot, but they do not
    wait for the server's concurrency limit or count against its queue, which this task passed."""
    checked: Any = None
    """What the engine's :meth:`Engine.check_request` returned for this request (None without one)."""

    def image(self, source: str | bytes) -> Image:
        """The decoded image of a source in the request: an ``image_url`` part's URL, an
        embedding input's data URL, an edit's image bytes."""
        return self.images[source]


async def import_module(name: str) -> ModuleType:
    """The module ``name``, imported in a worker thread the first time. An engine's library
    (torch, transformers, ctranslate2, onnxruntime, a native backend) takes seconds to import;
    imported from an async method it would stall the event loop, and every request with it.
    Engines import their heavy modules through this in their async methods."""
    module = sys.modules.get(name)
    if module is None:
        module = await trio.to_thread.run_sync(importlib.import_module, name)
    return module


class ChunkSink:
    """Where an engine sends the chunks of a completion (or the audio of speech), from trio
    or from a thread.

    From a worker thread, :meth:`send_from_thread` also checks for cancellation,
    so a cancelled request stops generation within a token.
    """

    def __init__(self, on_chunk: Callable[["CompletionChunk"], None]):
        self._on_chunk = on_chunk
        self.token = trio.lowlevel.current_trio_token()

    async def send(self, chunk: "CompletionChunk") -> None:
        self._on_chunk(chunk)
        await trio.lowlevel.checkpoint()

    def send_nowait(self, chunk: "CompletionChunk") -> None:
        """Send from trio without yielding."""
        self._on_chunk(chunk)

    def send_from_thread(self, chunk: "CompletionChunk") -> None:
        """Send from a worker thread. In a thread started by ``trio.to_thread.run_sync`` this
        raises ``trio.Cancelled`` once the request is cancelled, so generation stops there."""
        try:
            trio.from_thread.check_cancelled()
        except RuntimeError:
            pass  # a thread of the engine's own (a scheduler): the engine watches cancellation itself
        trio.from_thread.run_sync(self._on_chunk, chunk, trio_token=self.token)


class Engine:
    """Base class of engines. Subclass it and register the class with ``register_engines``.

    Class attributes describe the engine without importing its heavy library:

    - ``name``: the value of ``engine`` in a model's configuration.
    - ``tasks``: the task names it implements; ``default_task`` when a model names none.
    - ``options``: a Struct of the engine's own model options (flat in the model table).
    - ``capabilities``: samplers and task features it implements natively (names from the
      sampler and task registries), e.g. ``{"temperature", "seed", "tools", "logprobs"}``.
    - ``logits_processors``: whether it applies plugin samplers' logits processors.
    - ``needs_model_file``: whether a model needs ``url``/``file``/``location``.
    - ``audio_sample_rate``: the rate speech-to-text audio is decoded to for it.

    Optional task methods (``rerank``, ``tokenize``, ``detokenize``) refuse by default;
    an engine that overrides one offers it (see :meth:`implements`).
    """

    name: ClassVar[str]
    tasks: ClassVar[frozenset[str]]
    default_task: ClassVar[str]
    options: ClassVar[type[msgspec.Struct]] = NoOptions
    capabilities: ClassVar[frozenset[str]] = frozenset()
    logits_processors: ClassVar[bool] = False
    needs_model_file: ClassVar[bool] = True
    audio_sample_rate: ClassVar[int] = 16000

    def __init__(self, store: "ModelStore | None" = None, samplers: "dict[str, Sampler] | None" = None):
        self.store = store
        self.samplers = samplers or {}
        """The sampler registry by name: an engine with ``logits_processors`` builds plugin
        samplers' processors from it (see :func:`lllms_core.samplers.requested_logits_processors`)."""

    def gpu_available(self) -> bool:
        """Whether this engine can use a GPU on this machine; ``device.gpu = "auto"`` models take
        the GPU only then. Called once, in a worker thread, when the pool starts, so it may
        import the engine's library."""
        return False

    def check_model(self, model: "ModelConfig", config: "Config") -> None:
        """Check a model against the whole configuration (the models it uses, say); raise
        :class:`~lllms_core.errors.ConfigError`. Called when a server is built. Optional."""

    async def prepare_model(self, model: "ModelConfig", location: Path | None) -> Any:
        """Make a downloaded, verified model ready to load (convert, check); return what
        ``create_instance`` needs (by default the file's location). Runs once per model
        and process; may use ``self.store`` to fetch companion files."""
        return location

    async def create_instance(self, model: "ModelConfig", prepared: Any, device: Device) -> EngineInstance:
        """Load the model; return an :class:`EngineInstance`."""
        raise NotImplementedError

    async def dispose_instance(self, instance: EngineInstance) -> None:
        """Free what ``create_instance`` loaded. Called once per instance, also on cancellation."""

    def memory_estimate(self, model: "ModelConfig", location: Path | None, device: Device) -> int | None:
        """Bytes of host memory an instance of ``model`` will take on ``device``, before one is
        loaded (the pool's memory budget admits it by this); None: unknown. Called on the trio
        thread, before and again after ``prepare_model`` (which may read what it needs): it
        must be quick. The default is the size of the model's file or directory."""
        if location is None:
            return None
        try:
            if location.is_dir():
                return sum(path.stat().st_size for path in location.rglob("*") if path.is_file())
            return location.stat().st_size
        except OSError:
            return None

    async def state_signature(self, model: "ModelConfig", instance: EngineInstance) -> dict[str, Any] | None:
        """What a saved state of this instance depends on besides the model id: the model
        file's digest, the engine's version, the context settings. States are written to
        disk under it and never restored into an instance with another signature. None (the
        default): the instance's states stay in RAM only."""
        return None

    async def save_states(self, instance: EngineInstance, cache: Any, keys: list[tuple[str, ...]]) -> None:
        """Save the state of every slot into ``cache`` (a PromptCache), each under the pool's
        context key ``keys[slot]``; called before the instance is disposed. Optional."""

    def check_request(self, model: "ModelConfig", request: Any) -> Any:
        """Check a request before it is queued; optional. Runs in a worker thread, without an
        instance. Raise an :class:`~lllms_core.errors.LllmsError` (e.g. a 400) for what the
        engine will refuse, so that a streamed request gets it as its HTTP status rather than
        as an error event after a 200. What it returns reaches the task method as
        ``context.checked``, so work done here (a parsed grammar) is not done again."""
        return None

    async def preload(self, context: TaskContext) -> None:
        """Evaluate the model's ``initial_messages`` / ``prefix`` into a slot, so that requests
        starting with them reuse that state. Optional."""

    async def chat_completion(
        self, context: TaskContext, request: "ChatCompletionRequest", sink: ChunkSink
    ) -> "CompletionResult":
        raise NotImplementedError

    async def text_completion(
        self, context: TaskContext, request: "TextCompletionRequest", sink: ChunkSink
    ) -> "CompletionResult":
        raise NotImplementedError

    async def embedding(self, context: TaskContext, request: "EmbeddingRequest") -> "EmbeddingResult":
        raise NotImplementedError

    async def speech_to_text(self, context: TaskContext, request: "TranscriptionRequest") -> "TranscriptionResult":
        """Transcribe (or translate) ``context.audio``."""
        raise NotImplementedError

    async def stream_speech_to_text(
        self, context: TaskContext, request: "TranscriptionRequest", sink: ChunkSink
    ) -> "TranscriptionResult":
        """As :meth:`speech_to_text`, sending the text as it is recognised as
        :class:`~lllms_core.schemas.CompletionChunk` deltas whose concatenation is the result's
        text. By default the whole text once, at the end."""
        from lllms_core.schemas import CompletionChunk

        result = await self.speech_to_text(context, request)
        if result.text:
            await sink.send(CompletionChunk(text=result.text))
        return result

    async def text_to_speech(self, context: TaskContext, request: "SpeechRequest", sink: ChunkSink) -> "SpeechResult":
        """Speak ``request.input``: send the audio as :class:`~lllms_core.schemas.AudioChunk`s
        while it is synthesized (at least one: it carries the sample rate), return the totals.
        The core encodes it into the requested format."""
        raise NotImplementedError

    async def image_to_text(self, context: TaskContext, request: "ImageToTextRequest") -> "ImageToTextResult":
        raise NotImplementedError

    async def image_generation(self, context: TaskContext, request: "ImageGenerationRequest") -> "ImageGenerationResult":
        """Generate ``request.count`` images; with ``request.image``, edit that image (and,
        with ``request.mask``, only where the mask is transparent). Report the steps with
        ``context.progress`` and stop between steps once the request is cancelled."""
        raise NotImplementedError

    async def rerank(self, context: TaskContext, request: "RerankRequest") -> "RerankResult":
        """Score each document's relevance to the query, for a model configured with the
        ``rerank`` task (a cross-encoder). Embedding models rerank without it: the core
        scores them by cosine similarity."""
        raise self.unsupported("model", "reranking")

    async def tokenize(self, context: TaskContext, request: "TokenizeRequest") -> "TokenizeResult":
        """The token ids of ``request.content`` (or of ``request.messages`` rendered with the
        model's chat template), with their pieces when ``with_pieces``. Optional; runs its
        blocking work in a thread."""
        raise self.unsupported("model", "tokenizing")

    async def detokenize(self, context: TaskContext, request: "DetokenizeRequest") -> "DetokenizeResult":
        """The text of token ids. Optional; runs its blocking work in a thread."""
        raise self.unsupported("model", "detokenizing")

    @classmethod
    def implements(cls, method: str) -> bool:
        """Whether this engine overrides an optional method of :class:`Engine`."""
        return getattr(cls, method) is not getattr(Engine, method)

    def unsupported(self, param: str, what: str | None = None) -> UnsupportedParameterError:
        """The error for a parameter this engine cannot honour."""
        return UnsupportedParameterError(
            f"engine {self.name!r} does not support {what or repr(param)}", param=param
        )


def check_token_ids(tokens: list[int], vocabulary_size: int, param: str) -> None:
    """Refuse token ids outside a vocabulary of ``vocabulary_size`` tokens, naming ``param``."""
    for token in tokens:
        if not 0 <= token < vocabulary_size:
            raise InvalidRequestError(
                f"token id {token} is outside the vocabulary (0..{vocabulary_size - 1})", param=param
            )


def normalize_embedding(vector: list[float], dimensions: int | None = None) -> list[float]:
    """Cut an embedding to ``dimensions`` (Matryoshka style) and scale it to unit length."""
    if dimensions is not None:
        vector = vector[:dimensions]
    norm = math.sqrt(sum(value * value for value in vector))
    return [value / norm for value in vector] if norm > 0 else list(vector)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norms if norms else 0.0


async def cosine_rerank(engine: Engine, context: TaskContext, request: "RerankRequest") -> "RerankResult":
    """Relevance scores as the cosine similarity of each document's embedding with the query's,
    from ``engine.embedding``: how an embedding model reranks (and an engine's ``rerank`` for a
    model that has no scoring head of its own)."""
    from lllms_core.schemas import EmbeddingRequest, RerankResult

    embedded = await engine.embedding(context, EmbeddingRequest(model=request.model, input=[request.query, *request.texts]))
    query, *documents = embedded.embeddings
    return RerankResult(scores=[cosine(query, document) for document in documents], prompt_tokens=embedded.prompt_tokens)
