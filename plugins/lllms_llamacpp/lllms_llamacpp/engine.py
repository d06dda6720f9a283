"""The ``llamacpp`` engine: GGUF models through llama.cpp, with continuous batching.

One instance is one model and one llama context holding ``parallel`` sequences
(plus as many spare ones for the extra choices of ``n > 1`` and for extra prompts
of a text completion). A scheduler thread per instance decodes them together
(see :mod:`lllms_llamacpp.scheduler`). llama_cpp is imported only when an
instance is created.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import msgspec
import trio
from msgspec import Meta

from lllms_core.plugin_api import (
    ChatCompletionRequest,
    ChunkSink,
    CompletionChunk,
    CompletionResult,
    ContextLengthExceededError,
    DetokenizeRequest,
    DetokenizeResult,
    Device,
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    EngineError,
    EngineInstance,
    InvalidRequestError,
    ModelLoadError,
    NamedToolChoice,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    TaskContext,
    TextCompletionRequest,
    TokenizeRequest,
    TokenizeResult,
    Usage,
    common_prefix,
    message_text,
    normalize_embedding,
)

if TYPE_CHECKING:
    from lllms_core.plugin_api import ModelConfig

    from lllms_llamacpp.chat import ChatTemplate
    from lllms_llamacpp.native import Context, Model, SamplingParams
    from lllms_llamacpp.scheduler import Job, Scheduler


class LoraAdapter(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str
    scale: float = 1.0


class ProjectorFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A multimodal projector (mmproj GGUF): where it comes from, as a model's own file."""

    url: str | None = None
    file: str | None = None
    sha256: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{64}$")] | None = None


class Prepared(NamedTuple):
    path: Path | None
    projector: Path | None


class LlamaCppOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, omit_defaults=True):
    """Options of a llamacpp model, written flat in the model's table."""

    parallel: Annotated[int, Meta(ge=1, le=64)] = 4
    """Sequences (slots) one instance processes at once, batched together."""
    batch_size: Annotated[int, Meta(ge=1)] = 512
    """Most tokens decoded in one step (llama.cpp's n_batch)."""
    ubatch_size: Annotated[int, Meta(ge=1)] = 512
    """Physical batch size (llama.cpp's n_ubatch)."""
    flash_attention: bool | None = None
    """None: llama.cpp decides."""
    mmap: bool = True
    lora: list[LoraAdapter] = []
    grammars: dict[str, str] = {}
    """Named GBNF grammars that requests may name in ``grammar``."""
    context_overflow: Literal["drop_oldest", "error"] = "drop_oldest"
    """A prompt too long for the context: drop the oldest turns (text: the oldest tokens), or refuse."""
    pooling: Literal["mean", "cls", "last"] | None = None
    """Embedding pooling; default: the GGUF's pooling type, else mean."""
    chat_template: str | None = None
    """A Jinja chat template replacing the GGUF's own."""
    mmproj: str | ProjectorFile | None = None
    """The multimodal projector that lets the model see images: a URL (downloaded and
    verified by the store, like the model), a path, or ``{url, file, sha256}``."""


DEFAULT_CONTEXT_PER_SEQUENCE = 4096


class LlamaCppInstance(EngineInstance):
    """A model with either a generation context and its scheduler, or an embedding context."""

    model: "Model"
    options: LlamaCppOptions
    n_ctx_seq: int
    """Tokens one sequence holds (the model's ``context_size``)."""
    context: "Context | None"
    scheduler: "Scheduler | None"
    embed_context: "Context | None"
    template: "ChatTemplate | None"
    device_info: dict[str, Any]
    projector: Any = None
    """The multimodal projector (:class:`lllms_llamacpp.vision.Projector`), if configured."""

    def info(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "device": self.device_info,
            "context_per_sequence": self.n_ctx_seq,
            "kv_bytes_per_token": self.model.kv_bytes_per_token,
        }
        if self.scheduler is not None:
            facts.update(self.scheduler.info())
        return facts

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        if self.projector is not None:
            self.projector.close()
            self.projector = None
        for context in (self.context, self.embed_context):
            if context is not None:
                context.close()
        self.context = self.embed_context = None
        self.model.close()

    # --- prompts ----------------------------------------------------------------

    def tokenize_prompt(self, text: str) -> list[int]:
        """Tokens of a rendered prompt: special tokens parsed, BOS added unless already there."""
        model = self.model
        bos_text = model.piece_text(model.bos) if model.bos >= 0 else ""
        add_bos = model.add_bos and not (bos_text and text.startswith(bos_text))
        return model.tokenize(text, add_special=add_bos, parse_special=True)

    def tokenize_chat(self, text: str, contents: list[str], starts_prompt: bool = True) -> list[int]:
        """Tokens of a rendered chat: the template's special tokens are parsed, but text
        from the messages (``contents``) that spells a special token stays plain text, so
        a message cannot forge a turn. ``starts_prompt``: false for text after an image,
        which gets no BOS."""
        model = self.model
        forged = [content for content in contents if self.spells_special(content)]
        if not forged:
            return self.tokenize_prompt(text) if starts_prompt else model.tokenize(text, add_special=False, parse_special=True)
        tokens: list[int] = []
        position = 0
        for content in forged:
            found = text.find(content, position)
            if found == -1:  # a template that trims messages
                content = content.strip()
                found = text.find(content, position)
            if found == -1:  # a template that rewrites messages: its text is its own
                continue
            tokens += self.tokenize_prompt(text[position:found]) if position == 0 and starts_prompt else model.tokenize(
                text[position:found], add_special=False, parse_special=True
            )
            tokens += model.tokenize(content, add_special=False, parse_special=False)
            position = found + len(content)
        tokens += model.tokenize(text[position:], add_special=False, parse_special=True)
        return tokens

    def spells_special(self, content: str) -> bool:
        return any(special in content for special in self.model.special_texts)

    def keep_held_tokens(self, slot: int, prompt: list[int]) -> list[int]:
        """The prompt, with the tokens the slot's sequence holds wherever the prompt's text
        continues them.

        A follow-up turn resends the previous answer as text, and tokenizing it again may
        split it otherwise than the model generated it (``"\\n\\n"`` as one token or two):
        from the first difference on, the rest of the conversation would be evaluated again.
        The held tokens spell the same text, so they are kept and only the text after them is
        tokenized. Only for prompts whose messages spell no special token: the text after the
        held tokens is then tokenized as :meth:`tokenize_prompt` would."""
        held = list(self.slot_states[slot].tokens)  # a snapshot: the scheduler thread owns the list
        same = common_prefix(held, prompt)
        if same == len(held):
            return prompt
        model = self.model
        held_rest, prompt_rest = model.spell(held[same:]), model.spell(prompt[same:])
        if len(prompt_rest) <= len(held_rest) or not prompt_rest.startswith(held_rest):
            return prompt
        try:
            text = prompt_rest[len(held_rest) :].decode("utf-8")
        except UnicodeDecodeError:  # the held tokens end inside a character
            return prompt
        tail = model.tokenize(text, add_special=False, parse_special=True)
        if model.spell(tail) != prompt_rest[len(held_rest) :]:  # a tokenizer that adds a leading space
            return prompt
        return held + tail if len(held) + len(tail) < self.n_ctx_seq else prompt

    def embed(self, inputs: list[list[int]], pooling: str) -> list[list[float]]:
        """Embeddings of token lists, several sequences per batch (runs in a thread)."""
        import numpy as np

        context = self.embed_context
        vectors: list[list[float]] = []
        start = 0
        while start < len(inputs):
            group, total = [], 0
            while (
                start + len(group) < len(inputs)
                and len(group) < context.settings.n_seq
                and total + len(inputs[start + len(group)]) <= context.n_batch
            ):
                total += len(inputs[start + len(group)])
                group.append(inputs[start + len(group)])
            context.clear()
            context.clear_batch()
            spans = []
            for seq, tokens in enumerate(group):
                first = context.batch.n_tokens
                for position, token in enumerate(tokens):
                    context.add(token, position, seq, True)
                spans.append((first, len(tokens)))
            if context.decode() != 0:
                raise EngineError("llama.cpp could not compute the embeddings")
            for first, length in spans:
                rows = np.stack([context.embeddings(first + offset) for offset in range(length)])
                if pooling == "cls":
                    vector = rows[0]
                elif pooling == "last":
                    vector = rows[-1]
                else:
                    vector = rows.mean(axis=0)
                vectors.append(vector.astype(float).tolist())
            start += len(group)
        return vectors


def options_of(model: "ModelConfig") -> LlamaCppOptions:
    return model.options if isinstance(model.options, LlamaCppOptions) else LlamaCppOptions()


def load_instance(
    model_config: "ModelConfig", path: str | os.PathLike, device: Device, projector: str | os.PathLike | None = None
) -> LlamaCppInstance:
    """Load a model and create its context (and scheduler, and multimodal projector); blocking."""
    from lllms_llamacpp.chat import ChatTemplate
    from lllms_llamacpp.native import Context, ContextSettings, Model
    from lllms_llamacpp.scheduler import Scheduler

    options = options_of(model_config)
    gpu_layers = device.gpu_layers if device.gpu_layers is not None else (-1 if device.gpu else 0)
    model = Model(str(path), gpu_layers=999 if gpu_layers < 0 else gpu_layers, mmap=options.mmap, mem_lock=device.mem_lock)
    # one thread per physical core (about half the logical CPUs): ggml's threads spin, and
    # oversubscribed they slow decoding down by an order of magnitude
    threads = device.cpu_threads or max(1, (os.cpu_count() or 2) // 2)
    n_ctx_seq = model_config.context_size or min(model.n_ctx_train or DEFAULT_CONTEXT_PER_SEQUENCE, DEFAULT_CONTEXT_PER_SEQUENCE)
    parallel = options.parallel
    instance = LlamaCppInstance(slots=parallel, model=model, n_ctx_seq=n_ctx_seq, options=options,
                                scheduler=None, context=None, embed_context=None, template=None)
    instance.device_info = {
        "gpu": device.gpu,
        "name": device.name,
        "gpu_layers": gpu_layers,
        "cpu_threads": threads,
        "mem_lock": device.mem_lock,
    }
    lora = [(adapter.path, adapter.scale) for adapter in options.lora]
    try:
        if model_config.task == "embedding":
            instance.embed_context = Context(
                model,
                ContextSettings(n_ctx=n_ctx_seq, n_seq=parallel, n_batch=n_ctx_seq, n_ubatch=n_ctx_seq,
                                threads=threads, flash_attention=options.flash_attention, embeddings=True),
                lora,
            )
            return instance
        spare = parallel
        batch = max(options.batch_size, 2 * parallel)
        instance.context = Context(
            model,
            ContextSettings(n_ctx=n_ctx_seq * parallel, n_seq=parallel + spare, n_batch=batch,
                            n_ubatch=min(options.ubatch_size, batch), threads=threads,
                            flash_attention=options.flash_attention),
            lora,
        )
        instance.chat_template = options.chat_template or model.chat_template
        instance.template = ChatTemplate(
            options.chat_template or model.chat_template,
            bos_token=model.piece_text(model.bos) if model.bos >= 0 else "",
            eos_token=model.piece_text(model.eos) if model.eos >= 0 else "",
        )
        if projector is not None:
            from lllms_llamacpp.vision import Projector

            instance.projector = Projector(model, str(projector), threads=threads, gpu=gpu_layers != 0)
        instance.scheduler = Scheduler(
            model, instance.context, slots=parallel, spare=spare, n_ctx_seq=n_ctx_seq,
            prompt_chunk=max(32, min(options.ubatch_size, batch) // 4), projector=instance.projector,
        )
        instance.slot_states = instance.scheduler.sequences[:parallel]
    except BaseException:
        instance.close()
        raise
    return instance


class LlamaCppEngine(Engine):
    name = "llamacpp"
    tasks = frozenset({"chat-completion", "text-completion", "embedding"})
    default_task = "chat-completion"
    options = LlamaCppOptions
    capabilities = frozenset(
        {
            "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "penalty_window",
            "frequency_penalty", "presence_penalty", "logit_bias", "seed", "grammar",
            "n", "logprobs", "json_object", "json_schema", "tools", "echo", "suffix",
            "token_prompt", "token_input", "pooling", "vision",
        }
    )

    def gpu_available(self) -> bool:
        """Whether this llama.cpp build can offload to a GPU (a CPU-only build cannot)."""
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())

    async def prepare_model(self, model: "ModelConfig", location: Path | None) -> Any:
        """The model's file, and its multimodal projector fetched and verified as a companion file."""
        projector = options_of(model).mmproj
        if projector is None:
            return location
        if isinstance(projector, str):
            is_url = projector.split("://", 1)[0] in ("http", "https", "hf", "package")
            projector = ProjectorFile(url=projector) if is_url else ProjectorFile(file=projector)
        if self.store is None:
            raise ModelLoadError(f"model {model.id!r}: a multimodal projector needs the model store")
        path = await self.store.companion(model, url=projector.url, file=projector.file, sha256=projector.sha256)
        return Prepared(location, path)

    async def create_instance(self, model: "ModelConfig", prepared: Any, device: Device) -> EngineInstance:
        projector = prepared.projector if isinstance(prepared, Prepared) else None
        location = (prepared.path if isinstance(prepared, Prepared) else prepared) or model.location or model.file
        if location is None:
            raise ModelLoadError(f"model {model.id!r} has no file to load")
        return await trio.to_thread.run_sync(load_instance, model, Path(location), device, projector)

    async def dispose_instance(self, instance: EngineInstance) -> None:
        await trio.to_thread.run_sync(instance.close)

    # --- tasks ------------------------------------------------------------------

    async def preload(self, context: TaskContext) -> None:
        instance: LlamaCppInstance = context.instance
        model = context.model
        if instance.scheduler is None:
            return
        if model.task == "chat-completion" and model.initial_messages:
            messages = [{"role": message.role, "content": message.content} for message in model.initial_messages]
            text = instance.template.render(messages, tools=None, add_generation_prompt=False)
            tokens = instance.tokenize_prompt(text)
        elif model.prefix:
            tokens = instance.tokenize_prompt(model.prefix)
        else:
            return
        from lllms_llamacpp.scheduler import Job

        job = Job(prompt=tokens[: instance.n_ctx_seq - 1], seq=context.slot, sampler=None, max_new=0,
                  evaluate_only=True, fresh=context.fresh)
        await self._run(instance, [job], None)

    async def chat_completion(
        self, context: TaskContext, request: ChatCompletionRequest, sink: ChunkSink
    ) -> CompletionResult:
        from lllms_llamacpp.chat import prepare_messages, tool_definitions
        from lllms_llamacpp.grammars import tool_call_grammar

        instance = self._generator(context)
        options = instance.options
        template = instance.template
        use_tools = bool(request.tools) and request.tool_choice != "none"
        tools = tool_definitions(request.tools) if use_tools else None
        grammar = self._grammar(request, options)
        if use_tools and (request.tool_choice == "required" or isinstance(request.tool_choice, NamedToolChoice)):
            if grammar is not None:
                raise InvalidRequestError("a forced tool call cannot be combined with grammar or response_format",
                                          param="tool_choice")
            functions = [tool.function for tool in request.tools]
            if isinstance(request.tool_choice, NamedToolChoice):
                functions = [f for f in functions if f.name == request.tool_choice.function.name]
                if not functions:
                    raise InvalidRequestError(
                        f"tool_choice names the function {request.tool_choice.function.name!r}, which is not in tools",
                        param="tool_choice",
                    )
            grammar = tool_call_grammar(
                [(f.name, f.parameters if f.parameters is not msgspec.UNSET else {}) for f in functions],
                parallel=request.parallel_tool_calls is not False and not isinstance(request.tool_choice, NamedToolChoice),
            )
        from lllms_llamacpp.vision import prompt_images

        images = await prompt_images(instance, context, request)
        try:
            marker = images.marker if images else None
            messages, prefill = prepare_messages(request.messages, template, tools, marker)
            template_tools = tools if template.knows_tools else None

            contents = [message_text(message) for message in request.messages]

            def tokens_of(turns: list[dict]) -> list[int]:
                text = template.render(turns, tools=template_tools, add_generation_prompt=True)
                if images:
                    return images.tokenize(text + (prefill or ""), contents)
                return instance.tokenize_chat(text + (prefill or ""), contents)

            prompt = self._fit_chat(instance, messages, tokens_of, request.token_limit)
            if not images and not context.fresh and not any(instance.spells_special(content) for content in contents):
                prompt = instance.keep_held_tokens(context.slot, prompt)
            known = {tool.function.name for tool in request.tools} if use_tools else None
            media = images.positions(prompt) if images else None
            return await self._complete(context, request, sink, [prompt], grammar, known, echo=[None], media=media)
        finally:
            if images:
                images.release()

    async def text_completion(
        self, context: TaskContext, request: TextCompletionRequest, sink: ChunkSink
    ) -> CompletionResult:
        instance = self._generator(context)
        model = instance.model
        grammar = self._grammar(request, instance.options)
        prompts, echoes = [], []
        for prompt in request.prompts:
            if isinstance(prompt, str):
                text = prompt
                if request.suffix:
                    tokens = self._infill(instance, prompt, request.suffix)
                else:
                    tokens = instance.tokenize_prompt(prompt) if prompt else [model.bos if model.bos >= 0 else model.eos]
            else:
                model.check_tokens(prompt, "prompt")
                if not prompt:
                    raise InvalidRequestError("a token prompt must not be empty", param="prompt")
                if request.suffix:
                    raise self.unsupported("suffix", "a suffix with a token prompt")
                tokens, text = list(prompt), model.detokenize(prompt)
            prompts.append(self._fit_text(instance, tokens, request.token_limit))
            echoes.append(text if request.echo else None)
        return await self._complete(context, request, sink, prompts, grammar, None, echo=echoes)

    async def embedding(self, context: TaskContext, request: EmbeddingRequest) -> EmbeddingResult:
        instance: LlamaCppInstance = context.instance
        model = instance.model
        if instance.embed_context is None:
            raise InvalidRequestError(f"model {context.model.id!r} is not configured for embeddings", param="model")
        token_lists = []
        for item in request.inputs:
            if isinstance(item, str):
                tokens = model.tokenize(item, add_special=True, parse_special=False)
            else:
                model.check_tokens(item, "input")
                tokens = list(item)
            if not tokens:
                raise InvalidRequestError("an input must not be empty", param="input")
            if len(tokens) > instance.n_ctx_seq:
                raise ContextLengthExceededError(
                    f"an input has {len(tokens)} tokens; this model embeds at most {instance.n_ctx_seq}", param="input"
                )
            token_lists.append(tokens)
        if request.dimensions is not None and request.dimensions > model.n_embd:
            raise InvalidRequestError(
                f"dimensions ({request.dimensions}) exceeds the model's {model.n_embd}", param="dimensions"
            )
        pooling = request.pooling or instance.options.pooling or model.pooling or "mean"
        vectors = await trio.to_thread.run_sync(instance.embed, token_lists, pooling, limiter=instance.limiter)
        return EmbeddingResult(
            embeddings=[normalize_embedding(vector, request.dimensions) for vector in vectors],
            prompt_tokens=sum(len(tokens) for tokens in token_lists),
        )

    async def tokenize(self, context: TaskContext, request: TokenizeRequest) -> TokenizeResult:
        instance: LlamaCppInstance = context.instance
        return await trio.to_thread.run_sync(self._tokenize, instance, request, limiter=instance.limiter)

    def _tokenize(self, instance: LlamaCppInstance, request: TokenizeRequest) -> TokenizeResult:
        model = instance.model
        if request.messages is not None:
            if instance.template is None:
                raise InvalidRequestError(f"model {request.model!r} has no chat template", param="messages")
            from lllms_llamacpp.chat import prepare_messages, tool_definitions

            tools = tool_definitions(request.tools) if request.tools else None
            messages, prefill = prepare_messages(request.messages, instance.template, tools)
            text = instance.template.render(messages, tools=tools if instance.template.knows_tools else None, add_generation_prompt=True)
            tokens = instance.tokenize_chat(text + (prefill or ""), [message_text(m) for m in request.messages])
        else:
            tokens = model.tokenize(request.content, add_special=request.add_special, parse_special=False)
        pieces = [model.piece_text(token) for token in tokens] if request.with_pieces else None
        return TokenizeResult(tokens=tokens, pieces=pieces)

    async def detokenize(self, context: TaskContext, request: DetokenizeRequest) -> DetokenizeResult:
        instance: LlamaCppInstance = context.instance
        model = instance.model
        model.check_tokens(request.tokens, "tokens")
        content = await trio.to_thread.run_sync(model.detokenize, request.tokens, limiter=instance.limiter)
        return DetokenizeResult(content=content)

    # --- helpers ----------------------------------------------------------------

    @staticmethod
    def _generator(context: TaskContext) -> LlamaCppInstance:
        instance: LlamaCppInstance = context.instance
        if instance.scheduler is None:
            raise InvalidRequestError(f"model {context.model.id!r} is configured for embeddings only", param="model")
        return instance

    def _grammar(self, request: Any, options: LlamaCppOptions) -> str | None:
        from lllms_llamacpp.grammars import json_object_grammar, schema_grammar

        response_format = getattr(request, "response_format", None)
        structured = isinstance(response_format, (ResponseFormatJsonObject, ResponseFormatJsonSchema))
        if request.grammar is not None:
            if structured:
                raise InvalidRequestError("grammar and a JSON response_format cannot be combined", param="grammar")
            if request.grammar in options.grammars:
                return options.grammars[request.grammar]
            if "::=" not in request.grammar:
                raise InvalidRequestError(f"grammar {request.grammar!r} not found", param="grammar")
            return request.grammar
        if isinstance(response_format, ResponseFormatJsonObject):
            return json_object_grammar()
        if isinstance(response_format, ResponseFormatJsonSchema):
            schema = response_format.json_schema.schema
            return schema_grammar(schema if schema is not msgspec.UNSET else {}, param="response_format")
        return None

    def _fit_chat(self, instance: LlamaCppInstance, messages: list[dict], tokens_of, token_limit: int | None) -> list[int]:
        """Render the conversation so that it fits one sequence's context, following the
        model's ``context_overflow`` policy."""
        n_ctx = instance.n_ctx_seq
        tokens = tokens_of(messages)
        if instance.options.context_overflow == "error":
            self._check_fits(len(tokens), token_limit, n_ctx)
            return tokens
        target = n_ctx - min(token_limit or n_ctx // 4, n_ctx // 2)
        if len(tokens) > target:
            # keep the system message and the longest recent history that fits, starting at a
            # user turn; found by bisection, since a conversation may have hundreds of turns
            head = messages[:1] if messages and messages[0]["role"] == "system" else []
            starts = [i for i in range(len(head) + 1, len(messages)) if messages[i]["role"] == "user"]
            low, high = 0, len(starts) - 1
            while low <= high:
                middle = (low + high) // 2
                candidate = tokens_of(head + messages[starts[middle] :])
                if len(candidate) <= target:
                    tokens, high = candidate, middle - 1
                else:
                    low = middle + 1
            if low == len(starts) and starts:  # even the last user turn on its own is long
                tokens = tokens_of(head + messages[starts[-1] :])
        if len(tokens) >= n_ctx:
            raise ContextLengthExceededError(
                f"the prompt has {len(tokens)} tokens after dropping old turns; the context holds {n_ctx}",
                param="messages",
            )
        return tokens

    def _fit_text(self, instance: LlamaCppInstance, tokens: list[int], token_limit: int | None) -> list[int]:
        n_ctx = instance.n_ctx_seq
        if instance.options.context_overflow == "error":
            self._check_fits(len(tokens), token_limit, n_ctx, param="prompt")
            return tokens
        if len(tokens) < n_ctx:
            return tokens
        keep = n_ctx - min(token_limit or n_ctx // 4, n_ctx // 2)
        model = instance.model
        head = tokens[:1] if tokens[0] == model.bos and model.bos >= 0 else []
        return head + tokens[len(tokens) - keep + len(head) :]

    @staticmethod
    def _check_fits(prompt: int, token_limit: int | None, n_ctx: int, param: str = "messages") -> None:
        wanted = prompt + (token_limit or 1)
        if wanted > n_ctx:
            detail = f" and {token_limit} for the completion" if token_limit else ""
            raise ContextLengthExceededError(
                f"this model's context holds {n_ctx} tokens; the request needs {prompt} for the prompt{detail}",
                param=param,
            )

    def _infill(self, instance: LlamaCppInstance, prompt: str, suffix: str) -> list[int]:
        model = instance.model
        if not model.has_fim:
            raise self.unsupported("suffix", "a suffix: this model has no fill-in-the-middle tokens")
        prefix_id, suffix_id, middle_id = model.fim
        head = [model.bos] if model.add_bos and model.bos >= 0 else []
        return (
            head
            + [prefix_id]
            + model.tokenize(prompt, add_special=False, parse_special=False)
            + [suffix_id]
            + model.tokenize(suffix, add_special=False, parse_special=False)
            + [middle_id]
        )

    def _sampling(self, instance: LlamaCppInstance, request: Any, grammar: str | None) -> "SamplingParams":
        from lllms_llamacpp.native import SamplingParams

        params = SamplingParams(grammar=grammar)
        for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
            value = getattr(request, name)
            if value is not None:
                setattr(params, name, value)
        window = request.repeat_window
        if window is not None:
            params.repeat_window = instance.n_ctx_seq if window == -1 else window
        if request.logit_bias:
            params.logit_bias = self._logit_bias(instance.model, request.logit_bias)
        return params

    @staticmethod
    def _logit_bias(model: "Model", biases: dict[str, float]) -> dict[int, float]:
        result: dict[int, float] = {}
        for key, value in biases.items():
            bias = -math.inf if value <= -100 else float(value)
            if key.strip().lstrip("-").isdigit():
                tokens = [int(key)]
                model.check_tokens(tokens, "logit_bias")
            else:
                tokens = model.tokenize(key, add_special=False, parse_special=False)
            for token in tokens:
                result[token] = bias
        return result

    @staticmethod
    def _top_logprobs(request: Any) -> int | None:
        """None: no logprobs; else how many alternatives per token (chat: ``logprobs`` and
        ``top_logprobs``; text: the legacy ``logprobs`` count)."""
        if isinstance(request, ChatCompletionRequest):
            return (request.top_logprobs or 0) if request.logprobs or request.top_logprobs else None
        return request.logprobs

    async def _complete(
        self,
        context: TaskContext,
        request: Any,
        sink: ChunkSink,
        prompts: list[list[int]],
        grammar: str | None,
        tool_names: set[str] | None,
        echo: list[str | None],
        media: dict | None = None,
    ) -> CompletionResult:
        """Generate ``n`` choices for each prompt, as parallel sequences. ``media``: where the
        first prompt's images are (see :mod:`lllms_llamacpp.vision`)."""
        from lllms_llamacpp.chat import ToolCallParser
        from lllms_llamacpp.native import Sampler
        from lllms_llamacpp.scheduler import Job, TextStream

        instance: LlamaCppInstance = context.instance
        model = instance.model
        params = self._sampling(instance, request, grammar)
        seed = request.seed if request.seed is not None else random.getrandbits(32)
        top = self._top_logprobs(request)
        choices = request.choices
        jobs: list[Job] = []
        try:
            for number, prompt in enumerate(prompts):
                first: Job | None = None
                for choice in range(choices):
                    index = number * choices + choice
                    job = Job(
                        prompt=prompt,
                        seq=context.slot if index == 0 else None,
                        sampler=Sampler(model, params, seed + index),
                        max_new=min(request.token_limit or math.inf, instance.n_ctx_seq - len(prompt)),
                        index=index,
                        top_logprobs=top,
                        stream=TextStream(model, request.stop_list),
                        after=first,
                        fresh=context.fresh and index == 0,
                    )
                    if media and number == 0:
                        job.media = dict(media)
                        for owner in {id(m.owner): m.owner for m in media.values()}.values():
                            owner.acquire()
                    first = first or job
                    jobs.append(job)
        except BaseException:
            from lllms_llamacpp.scheduler import release_media

            for job in jobs:
                job.sampler.close()
                release_media(job)
            raise
        for job in jobs:
            text = echo[job.index // choices]
            if text:
                sink.send_nowait(CompletionChunk(index=job.index, text=text))
        parsers = {job.index: ToolCallParser(tool_names) for job in jobs} if tool_names else {}

        def on_chunk(index: int, text: str, token_logprobs: list | None) -> None:
            deltas = None
            if parsers:
                text, deltas = parsers[index].push(text)
            if text or token_logprobs or deltas:
                sink.send_nowait(CompletionChunk(index=index, text=text, logprobs=token_logprobs, tool_calls=deltas or None))

        results = await self._run(instance, jobs, on_chunk)
        finish_reasons = []
        usage = Usage()
        for job in jobs:
            reason, (prompt_tokens, completion_tokens, cached) = results[job.index]
            if job.after is None:
                usage.prompt_tokens += prompt_tokens
                usage.cached_tokens += cached
            usage.completion_tokens += completion_tokens
            if parsers:
                parser = parsers[job.index]
                text, deltas = parser.finish()
                if text or deltas:
                    sink.send_nowait(CompletionChunk(index=job.index, text=text, tool_calls=deltas or None))
                if parser.called and reason == "stop":
                    reason = "tool_calls"
            finish_reasons.append(reason)
        await trio.lowlevel.checkpoint()
        stops = [job.stream.filter.matched for job in jobs]
        return CompletionResult(finish_reasons=finish_reasons, usage=usage, stop_sequences=stops)

    async def _run(self, instance: LlamaCppInstance, jobs: list["Job"], on_chunk) -> dict[int, tuple]:
        """Hand jobs to the scheduler and pass their events on until all are done. A
        cancelled caller cancels its jobs: the scheduler drops them at its next step."""
        from lllms_llamacpp.scheduler import Delivery

        delivery = Delivery()
        for job in jobs:
            job.delivery = delivery
        results: dict[int, tuple] = {}
        error = None
        instance.scheduler.submit(jobs)
        try:
            while len(results) < len(jobs) and error is None:
                for kind, index, first, second in await delivery.receive.receive():
                    if kind == "chunk":
                        on_chunk(index, first, second)
                    elif kind == "done":
                        results[index] = (first, second)
                    else:
                        error = error or first
                        results[index] = ("error", None)
        except BaseException:
            instance.scheduler.cancel(jobs)
            raise
        finally:
            delivery.send.close()
        if error is not None:
            instance.scheduler.cancel(jobs)
            raise error
        return results
