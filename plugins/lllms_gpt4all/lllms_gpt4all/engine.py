"""The gpt4all engine: chat and text completions and embeddings with gpt4all 2.8.2.

One instance is one gpt4all model with one context, so it has one slot. The slot's
state is what that context holds: the chat turns or the text evaluated so far. A
chat request keeps the turns it shares with the context (the context is cut back
after the last of them) and evaluates only the rest; a text request whose prompt
starts with the context's text evaluates only the rest of it; any other request
resets the context.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import trio
from msgspec import Meta

from lllms_core.plugin_api import (
    ChatCompletionRequest,
    ChunkSink,
    CompletionOutput,
    CompletionResult,
    ContextBudget,
    Device,
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    EngineInstance,
    InvalidRequestError,
    ModelConfig,
    ModelLoadError,
    PromptTooLong,
    TaskContext,
    TextCompletionRequest,
    Usage,
    config_messages,
    cpu_threads,
    default_cache_dir,
    fit_messages,
    import_module,
    log_choices,
    normalize_embedding,
    tool_format_for,
    tool_setup,
)

from lllms_gpt4all.chat import CHAT_FORMATS, ChatFormat, Turn, detect_chat_format, turns
from lllms_gpt4all.compat import EMBEDDING_ARCHITECTURES, compatible_model, copy_name, read_gguf

log = logging.getLogger("lllms.gpt4all")

DEFAULT_CONTEXT_SIZE = 2048
ALL_LAYERS = 100
"""gpt4all's value for "offload every layer"."""

SAMPLING_DEFAULTS = {"temp": 0.7, "top_k": 40, "top_p": 0.4, "min_p": 0.0, "repeat_penalty": 1.18, "repeat_last_n": 64}
"""gpt4all's own defaults, for parameters a request leaves unset."""

# a template with exactly one %1 and no %2 (gpt4all's placeholders)
Template = Annotated[str, Meta(pattern=r"^(?:(?!%[12])[\s\S])*%1(?:(?!%[12])[\s\S])*$")]


class Gpt4AllOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Options of a gpt4all model (keys of its model table)."""

    batch_size: Annotated[int, Meta(ge=1, le=128)] = 128
    """Prompt tokens evaluated at once (gpt4all allows at most 128)."""
    chat_format: Literal["chatml", "llama3", "phi3"] | None = None
    """How messages become text; recognised from the GGUF's chat template when unset."""
    system_template: Template | None = None
    """Template of a system message, ``%1`` its text; overrides the chat format's."""
    user_template: Template | None = None
    assistant_template: Template | None = None
    embedding_prefix: str = ""
    """Text put before each input of an embedding model (e.g. ``search_document`` for Nomic Embed)."""


class PreparedModel(msgspec.Struct, kw_only=True):
    path: str
    """The file gpt4all loads: the model, or its compatible copy."""
    embedding: bool
    chat_format: ChatFormat | None
    trained_context: int | None
    chat_template: str | None = None
    """The GGUF's Jinja chat template: it shows the model's tool-call format."""


class ChatState(msgspec.Struct):
    turns: list[Turn]
    """The messages the context holds, in order, the generated answers included."""
    ends: list[int | None]
    """How many tokens the context held after each of them: where it can be cut back to.
    None after a question, which was evaluated with the start of its answer."""

    def common_turns(self, history: list[Turn]) -> int:
        """How many leading turns of ``history`` the context holds and can be cut back to."""
        count = 0
        for held, asked in zip(self.turns, history):
            if held != asked:
                break
            count += 1
        while count and self.ends[count - 1] is None:
            count -= 1
        return count


class TextState(msgspec.Struct):
    text: str
    """The text the context holds."""


class Gpt4AllInstance(EngineInstance):
    native: Any
    """The loaded :class:`lllms_gpt4all.native.NativeModel`."""
    chat_format: ChatFormat | None
    tool_format: Any
    """The tool-call format the model writes (:func:`lllms_core.chat.tool_format_for` its template)."""
    context_size: int

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.native.backend,
            "device": self.native.device,
            "context_size": self.context_size,
            "context_tokens": self.native.n_past,
        }


def native_device(device: Device) -> tuple[str, str | None]:
    """gpt4all's backend and GPU device for where the pool put an instance (GPT4All's
    own mapping of its ``device`` argument)."""
    if sys.platform == "darwin":
        return ("metal" if device.gpu else "cpu"), None
    if not device.gpu:
        return "kompute", None  # Kompute without a device runs on the CPU
    name = device.name
    if name is None or name == "gpu":
        return "kompute", "gpu"
    if name in ("cuda", "kompute"):
        return name, "gpu"
    if name.startswith("cuda:"):
        return "cuda", name.removeprefix("cuda:")
    return "kompute", name.removeprefix("kompute:")


class Generation:
    """One request's callbacks from gpt4all's thread: counts tokens, passes the text through
    the core's output (stop strings, tool calls) and sends chunks. Both raise
    ``trio.Cancelled`` once the request is cancelled, which stops gpt4all (see
    :meth:`NativeModel.prompt`); ``on_prompt_token`` raises :class:`PromptTooLong` once the
    prompt has more than ``limit`` tokens (``cached`` of them kept from the slot)."""

    def __init__(
        self, sink: ChunkSink | None = None, output: CompletionOutput | None = None, max_tokens: int = 0,
        limit: int | None = None, cached: int = 0,
    ):
        self.sink = sink
        self.output = output or CompletionOutput()
        self.max_tokens = max_tokens
        self.limit = limit
        self.cached = cached
        self.prompt_tokens = 0
        self.tokens = 0
        self.text = ""
        """Everything generated, stop strings included: what the context holds."""
        self.ended = False

    def on_prompt_token(self) -> bool:
        self.prompt_tokens += 1
        trio.from_thread.check_cancelled()
        if self.limit is not None and self.cached + self.prompt_tokens > self.limit:
            raise PromptTooLong(self.cached + self.prompt_tokens, at_least=True)
        return True

    def on_token(self, text: str) -> bool:
        self.tokens += 1
        self.text += text
        piece, self.ended = self.output.push(text)
        if piece:
            self._send(piece)
        return not self.ended

    def _send(self, piece) -> None:
        assert self.sink is not None
        self.sink.send_from_thread(piece.chunk())

    def finish(self) -> None:
        """After generation: send what was held back (a possible stop string, a call)."""
        if piece := self.output.flush():
            self._send(piece)

    def finish_reason(self, context_full: bool = False) -> str:
        cut = not self.ended and (self.tokens >= self.max_tokens or context_full)
        return self.output.finish_reason("length" if cut else "stop")

    def result(self, context_full: bool = False) -> CompletionResult:
        """The task's result (``cached`` prompt tokens were reused from the slot)."""
        return CompletionResult(
            finish_reasons=[self.finish_reason(context_full)],
            stop_sequences=[self.output.stop_sequence],
            usage=Usage(
                prompt_tokens=self.cached + self.prompt_tokens,
                completion_tokens=self.tokens,
                cached_tokens=self.cached,
            ),
        )


def _always() -> bool:
    return True


class Gpt4AllEngine(Engine):
    name = "gpt4all"
    tasks = frozenset({"chat-completion", "text-completion", "embedding"})
    default_task = "chat-completion"
    options = Gpt4AllOptions
    capabilities = frozenset({"temperature", "top_k", "top_p", "min_p", "repeat_penalty", "penalty_window", "tools"})

    # --- models and instances -------------------------------------------------

    async def prepare_model(self, model: ModelConfig, location: Path | None) -> PreparedModel:
        if location is None:
            raise ModelLoadError(f"model {model.id!r}: the gpt4all engine needs a GGUF file")
        return await trio.to_thread.run_sync(self._prepare, model, Path(location))

    def _prepare(self, model: ModelConfig, location: Path) -> PreparedModel:
        facts = read_gguf(location)
        embedding = facts.architecture in EMBEDDING_ARCHITECTURES
        if embedding and model.task != "embedding":
            raise ModelLoadError(f"model {model.id!r}: {location.name} is an embedding model; set task = \"embedding\"")
        if model.task == "embedding" and not embedding:
            raise ModelLoadError(
                f"model {model.id!r}: gpt4all computes embeddings only with BERT models "
                f"({', '.join(sorted(EMBEDDING_ARCHITECTURES))}); {location.name} is a {facts.architecture!r} model"
            )
        cache_dir = self.store.cache_dir if self.store is not None else default_cache_dir()
        path = compatible_model(location, facts, cache_dir, copy_name(location, model.sha256))
        return PreparedModel(
            path=str(path),
            embedding=embedding,
            chat_format=self._chat_format(model, location, facts.chat_template),
            trained_context=facts.trained_context,
            chat_template=facts.chat_template,
        )

    @staticmethod
    def _chat_format(model: ModelConfig, location: Path, jinja_template: str | None) -> ChatFormat | None:
        options: Gpt4AllOptions = model.options or Gpt4AllOptions()
        custom = {
            role: template
            for role in ("system", "user", "assistant")
            if (template := getattr(options, f"{role}_template")) is not None
        }
        base = CHAT_FORMATS.get(options.chat_format or detect_chat_format(jinja_template) or "")
        if base is not None:
            return msgspec.structs.replace(base, **custom)
        if len(custom) == 3:
            return ChatFormat(**custom)
        if model.task == "chat-completion":
            raise ModelLoadError(
                f"model {model.id!r}: the chat format of {location.name} is not one gpt4all's engine knows; set "
                f"`chat_format` ({', '.join(CHAT_FORMATS)}) or `system_template`, `user_template` and `assistant_template`"
            )
        return None

    async def create_instance(self, model: ModelConfig, prepared: PreparedModel, device: Device) -> Gpt4AllInstance:
        NativeModel = (await import_module("lllms_gpt4all.native")).NativeModel
        options: Gpt4AllOptions = model.options or Gpt4AllOptions()
        threads = cpu_threads(device.cpu_threads)
        log_choices(model.id, {"cpu_threads": threads})
        context_size = model.context_size or DEFAULT_CONTEXT_SIZE
        if prepared.embedding and model.context_size is None and prepared.trained_context:
            context_size = min(context_size, prepared.trained_context)

        def load(device: Device) -> NativeModel:
            backend, gpu_device = native_device(device)
            gpu_layers = device.gpu_layers
            return NativeModel(
                prepared.path,
                context_size=context_size,
                gpu_layers=ALL_LAYERS if gpu_layers is None or gpu_layers < 0 else gpu_layers,
                backend=backend,
                gpu_device=gpu_device,
                threads=threads.value,
                batch_size=options.batch_size,
            )

        try:
            native = await trio.to_thread.run_sync(load, device)
        except ModelLoadError as error:
            if not device.gpu or model.device.requires_gpu:
                raise
            log.info("model %r: no usable GPU (%s); loading it on the CPU", model.id, error.message)
            native = await trio.to_thread.run_sync(load, msgspec.structs.replace(device, gpu=False))
        log.info("model %r loaded by gpt4all on %s", model.id, native.device or native.backend)
        return Gpt4AllInstance(native=native, chat_format=prepared.chat_format, context_size=context_size,
                               tool_format=tool_format_for(prepared.chat_template), chat_template=prepared.chat_template)

    async def dispose_instance(self, instance: Gpt4AllInstance) -> None:
        # through the limiter: never while a generation still runs in its thread
        await trio.to_thread.run_sync(instance.native.close, limiter=instance.limiter)

    async def preload(self, context: TaskContext) -> None:
        instance: Gpt4AllInstance = context.instance
        model: ModelConfig = context.model
        native = instance.native
        chat_format = instance.chat_format

        def run() -> ChatState | TextState:
            native.reset()
            if model.initial_messages and chat_format is not None:
                state = ChatState([], [])
                history, _ = turns(config_messages(model.initial_messages), None, prefill=False)
                for role, text in history:
                    native.prompt(text, chat_format.template(role), special=False, on_prompt_token=_always)
                    state.turns.append((role, text))
                    state.ends.append(native.n_past)
                return state
            native.prompt(model.prefix or "", "%1%2", special=True, on_prompt_token=_always)
            return TextState(model.prefix or "")

        instance.slot_states[context.slot] = await self._run(instance, run)

    # --- tasks ----------------------------------------------------------------

    def _sampling(self, request: ChatCompletionRequest | TextCompletionRequest) -> dict[str, Any]:
        requested = {
            "temp": request.temperature,
            "top_k": request.top_k,
            "top_p": request.top_p,
            "min_p": request.min_p,
            "repeat_penalty": request.repeat_penalty,
            "repeat_last_n": request.repeat_window,
        }
        return {name: SAMPLING_DEFAULTS[name] if value is None else value for name, value in requested.items()}

    async def _run(self, instance: Gpt4AllInstance, work):
        from lllms_gpt4all.native import PromptError, too_long

        try:
            return await trio.to_thread.run_sync(work, limiter=instance.limiter)
        except PromptError as error:
            raise too_long(error, instance.context_size) from None

    async def chat_completion(
        self, context: TaskContext, request: ChatCompletionRequest, sink: ChunkSink
    ) -> CompletionResult:
        from lllms_gpt4all.native import PromptError

        instance: Gpt4AllInstance = context.instance
        chat_format = instance.chat_format
        if chat_format is None:
            raise InvalidRequestError(f"model {context.model.id!r} has no chat format; use text completions", param="model")
        tools = tool_setup(request, instance.tool_format)
        primer = ""
        if tools is not None and tools.forced is not None:
            if len(tools.forced) != 1:
                raise self.unsupported("tool_choice", "tool_choice 'required' among several functions (no grammars)")
            # no grammar: the answer starts with the call (and its arguments' object); the model
            # writes the arguments, which nothing holds to the schema
            primer = tools.format.call_text(tools.forced[0])[0] + ("{" if tools.format.json_arguments else "")
        native = instance.native
        state = instance.slot_states[context.slot]
        instance.slot_states[context.slot] = None  # unknown until this turn ends well
        reusable = isinstance(state, ChatState) and not context.fresh
        max_tokens = request.token_limit or instance.context_size
        sampling = self._sampling(request)
        budget = ContextBudget(instance.context_size, request.token_limit, context.model.context_overflow)

        def attempt(messages, limit: int) -> tuple[Generation, ChatState | None]:
            """Evaluate the conversation and answer, unless it has more than ``limit`` tokens
            (gpt4all cannot count tokens without evaluating them)."""
            conversation, prefill = turns(messages, tools)
            if primer:
                prefill = (prefill or "") + primer
            if conversation[-1][0] != "user":
                raise InvalidRequestError("the last message must be the user's (or an assistant prefill after it)",
                                          param="messages")
            history, question = conversation[:-1], conversation[-1][1]
            kept = state.common_turns(history) if reusable else 0
            if kept:
                native.cut_to(state.ends[kept - 1])
                evaluated = ChatState(state.turns[:kept], state.ends[:kept])
            else:
                native.reset()
                evaluated = ChatState([], [])
            output = CompletionOutput(request.stop_list, tools, primer=primer)
            generation = Generation(sink, output, max_tokens, limit, native.n_past)
            evaluate = dict(special=False, on_prompt_token=generation.on_prompt_token, context_shift=False)
            try:
                for role, text in history[kept:]:
                    native.prompt(text, chat_format.template(role), **evaluate)
                    evaluated.turns.append((role, text))
                    evaluated.ends.append(native.n_past)
                answer = dict(on_token=generation.on_token, max_tokens=max_tokens, sampling=sampling)
                if prefill is None:
                    native.prompt(question, chat_format.reply_template(), **evaluate, **answer)
                else:  # the answer continues the prefill
                    native.prompt(question, chat_format.reply_template(), **evaluate)
                    native.prompt(prefill, "%1%2", **evaluate, **answer)
            except PromptError as error:  # gpt4all refuses a message that does not fit what is left of its context
                raise PromptTooLong(instance.context_size, at_least=True) from error
            generation.finish()
            closing = Generation()
            native.prompt(chat_format.reply_end, "%1%2", special=True, on_prompt_token=closing.on_prompt_token)
            if native.n_past != generation.cached + generation.prompt_tokens + generation.tokens + closing.prompt_tokens:
                return generation, None  # the context was full: it no longer holds these turns
            evaluated.turns += [("user", question), ("assistant", (prefill or "") + generation.text)]
            evaluated.ends += [None, native.n_past]
            return generation, evaluated

        generation, evaluated = await self._run(instance, lambda: fit_messages(request.messages, attempt, budget))
        instance.slot_states[context.slot] = evaluated
        return generation.result(context_full=evaluated is None)

    async def text_completion(
        self, context: TaskContext, request: TextCompletionRequest, sink: ChunkSink
    ) -> CompletionResult:
        instance: Gpt4AllInstance = context.instance
        prompts = request.prompts
        if len(prompts) != 1:
            raise self.unsupported("prompt", "several prompts in one request")
        prompt = prompts[0]
        assert isinstance(prompt, str)  # token prompts are refused by the core
        native = instance.native
        state = instance.slot_states[context.slot]
        instance.slot_states[context.slot] = None
        reuse = isinstance(state, TextState) and not context.fresh and prompt.startswith(state.text)
        if not prompt and not reuse:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        max_tokens = request.token_limit or instance.context_size
        generation = Generation(sink, CompletionOutput(request.stop_list), max_tokens)
        sampling = self._sampling(request)
        # drop_oldest: gpt4all drops the oldest tokens of a full context itself
        shift = context.model.context_overflow == "drop_oldest"

        def run() -> bool:
            if reuse:
                generation.cached, remainder = native.n_past, prompt[len(state.text) :]
            else:
                native.reset()
                remainder = prompt
            native.prompt(
                remainder,
                "%1%2",
                special=True,
                on_prompt_token=generation.on_prompt_token,
                on_token=generation.on_token,
                max_tokens=max_tokens,
                sampling=sampling,
                context_shift=shift,
            )
            generation.finish()
            return native.n_past == generation.cached + generation.prompt_tokens + generation.tokens

        intact = await self._run(instance, run)
        if intact:
            instance.slot_states[context.slot] = TextState(prompt + generation.text)
        return generation.result(context_full=not intact)

    async def embedding(self, context: TaskContext, request: EmbeddingRequest) -> EmbeddingResult:
        instance: Gpt4AllInstance = context.instance
        options: Gpt4AllOptions = context.model.options or Gpt4AllOptions()
        texts = [text for text in request.inputs if isinstance(text, str)]  # token inputs are refused by the core
        if not all(texts):
            raise InvalidRequestError("an input is empty", param="input")

        def run() -> tuple[list[list[float]], int]:
            return instance.native.embed(texts, options.embedding_prefix, trio.from_thread.check_cancelled)

        vectors, tokens = await self._run(instance, run)
        return EmbeddingResult(
            embeddings=[normalize_embedding(vector, request.dimensions) for vector in vectors], prompt_tokens=tokens
        )
