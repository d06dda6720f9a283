"""The ``llamacpp`` engine: GGUF models through llama.cpp, with continuous batching.

One instance is one model and one llama context holding ``parallel`` sequences
(plus as many spare ones for the extra choices of ``n > 1`` and for extra prompts
of a text completion). A scheduler thread per instance decodes them together
(see :mod:`lllms_llamacpp.scheduler`). llama_cpp is imported only when an
instance is created.
"""

from __future__ import annotations

import functools
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
    Choice,
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
    RerankRequest,
    RerankResult,
    TaskContext,
    TextCompletionRequest,
    ThinkingBudget,
    TokenizeRequest,
    TokenizeResult,
    Usage,
    choose_sequences,
    common_prefix,
    cosine_rerank,
    cpu_threads,
    default_memory_budget,
    describe_choices,
    log_choices,
    model_file_digest,
    normalize_embedding,
)

if TYPE_CHECKING:
    from lllms_core.plugin_api import ModelConfig

    from lllms_core.plugin_api import ChatTemplate, CompletionOutput, RenderedPrompt, ToolSetup
    from lllms_llamacpp.vision import PromptImages

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

    parallel: Annotated[int, Meta(ge=1, le=64)] | None = None
    """Sequences (slots) one instance processes at once, batched together; none: chosen
    from the machine's cores and memory (see docs/configuration.md)."""
    kv_unified: bool | None = None
    """One KV cache shared by all sequences, or one per sequence; none: chosen per
    configuration (see docs/engines/llamacpp.md)."""
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
    pooling: Literal["mean", "cls", "last"] | None = None
    """Embedding pooling; default: the GGUF's pooling type, else mean."""
    chat_template: str | None = None
    """A Jinja chat template replacing the GGUF's own."""
    mmproj: str | ProjectorFile | None = None
    """The multimodal projector that lets the model see images: a URL (downloaded and
    verified by the store, like the model), a path, or ``{url, file, sha256}``."""


COMPUTE_BUFFER_BYTES_PER_BATCH_TOKEN = 4
"""An upper bound of llama.cpp's buffers beside weights and KV: logits (one float per
vocabulary entry) of every token of a batch."""


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

    defaults: dict[str, Any]
    """What was chosen for the machine (threads, sequences, context) and why."""

    def info(self) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "device": self.device_info,
            "defaults": self.defaults,
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

    def tokenize_rendered(self, prompt: "RenderedPrompt", images: "PromptImages | None" = None) -> list[int]:
        """Tokens of a rendered chat: the template's special tokens are parsed, the client's
        text (its plain spans) never is, so a message cannot forge a turn. With ``images``,
        each of their markers in the text is the image's tokens."""
        pieces = prompt.pieces()
        image_tokens = iter(images.tokens_for(prompt.text) if images else ())
        tokens: list[int] = []
        for number, (text, special) in enumerate(pieces):
            for part, segment in enumerate(text.split(images.marker) if images else [text]):
                if part:
                    tokens += next(image_tokens)
                if not tokens and special:
                    tokens += self.tokenize_prompt(segment)
                elif segment or not tokens:
                    tokens += self.model.tokenize(segment, add_special=not tokens and self.model.add_bos, parse_special=special)
        return tokens

    @functools.cached_property
    def longest_token(self) -> int:
        """The byte length of the vocabulary's longest token (its special tokens' text included)."""
        return max(len(self.model.spell([token])) for token in range(self.model.n_vocab))

    def shown_tokens(self, tool_format: Any) -> frozenset[int]:
        """The special tokens that spell a tool format's markers (``[TOOL_CALLS]``,
        ``<|python_tag|>``): generated, they show as their text, for the parser to see."""
        shown = set()
        for marker in tool_format.marker_texts:
            tokens = self.model.tokenize(marker, add_special=False, parse_special=True)
            if len(tokens) == 1:
                shown.add(tokens[0])
        return frozenset(shown)

    def keep_held_tokens(self, slot: int, prompt: list[int]) -> list[int]:
        """The prompt, with the tokens the slot's sequence holds wherever the prompt's text
        continues them.

        A follow-up turn resends the previous answer as text, and tokenizing it again may
        split it otherwise than the model generated it (``"\\n\\n"`` as one token or two):
        from the first difference on, the rest of the conversation would be evaluated again.
        The held tokens spell the same text, so they are kept and only the text after them is
        tokenized. Only for prompts without plain spans (client text spelling a special
        token): the text after the held tokens is then tokenized as :meth:`tokenize_prompt` would."""
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
    """Load a model and create its context (and scheduler, and multimodal projector); blocking.

    What the configuration leaves open is chosen for the machine: one thread per physical
    core this process may use, sequences and context per sequence from the cores and the
    memory budget (see docs/configuration.md), and the KV layout."""
    from lllms_core.plugin_api import ChatTemplate

    from lllms_llamacpp.native import Context, ContextSettings, Model
    from lllms_llamacpp.scheduler import Scheduler

    options = options_of(model_config)
    gpu_layers = device.gpu_layers if device.gpu_layers is not None else (-1 if device.gpu else 0)
    model = Model(str(path), gpu_layers=999 if gpu_layers < 0 else gpu_layers, mmap=options.mmap, mem_lock=device.mem_lock)
    threads = cpu_threads(device.cpu_threads)
    embedding = model_config.task in ("embedding", "rerank")  # an embedding context, no KV cache kept
    parallel, context = choose_sequences(
        parallel=options.parallel,
        context_size=model_config.context_size,
        trained_context=model.n_ctx_train,
        kv_bytes_per_token=0 if embedding else model.kv_bytes_per_token,
        weights_bytes=model.size_bytes,
        threads=threads.value,
        memory=device.memory_budget or default_memory_budget(),
    )
    kv_unified = kv_layout(options.kv_unified, parallel.value)
    choices = {"cpu_threads": threads, "parallel": parallel, "context_size": context}
    if not embedding:
        choices["kv_unified"] = kv_unified
    log_choices(model_config.id, choices)
    n_ctx_seq = context.value
    instance = LlamaCppInstance(slots=parallel.value, model=model, n_ctx_seq=n_ctx_seq, options=options,
                                scheduler=None, context=None, embed_context=None, template=None,
                                defaults=describe_choices(choices))
    instance.device_info = {
        "gpu": device.gpu,
        "name": device.name,
        "gpu_layers": gpu_layers,
        "cpu_threads": threads.value,
        "mem_lock": device.mem_lock,
    }
    lora = [(adapter.path, adapter.scale) for adapter in options.lora]
    try:
        if embedding:
            instance.embed_context = Context(
                model,
                ContextSettings(n_ctx=n_ctx_seq, n_seq=parallel.value, n_batch=n_ctx_seq, n_ubatch=n_ctx_seq,
                                threads=threads.value, flash_attention=options.flash_attention, embeddings=True,
                                rank=model_config.task == "rerank" and model.ranks),
                lora,
            )
            instance.memory_bytes = model.size_bytes + n_ctx_seq * model.n_vocab * COMPUTE_BUFFER_BYTES_PER_BATCH_TOKEN
            return instance
        spare, n_ctx = sequence_cells(parallel.value, n_ctx_seq, kv_unified.value)
        batch = max(options.batch_size, 2 * parallel.value)
        instance.context = Context(
            model,
            ContextSettings(n_ctx=n_ctx, n_seq=parallel.value + spare, n_batch=batch,
                            n_ubatch=min(options.ubatch_size, batch), threads=threads.value,
                            flash_attention=options.flash_attention, kv_unified=kv_unified.value),
            lora,
        )
        instance.memory_bytes = instance_memory(model.size_bytes, instance.context.kv_bytes, options, model.n_vocab)
        instance.chat_template = options.chat_template or model.chat_template
        instance.template = ChatTemplate(
            options.chat_template or model.chat_template,
            special_tokens=model.special_texts,
            variables={
                "bos_token": model.piece_text(model.bos) if model.bos >= 0 else "",
                "eos_token": model.piece_text(model.eos) if model.eos >= 0 else "",
            },
        )
        if projector is not None:
            from lllms_llamacpp.vision import Projector

            instance.projector = Projector(model, str(projector), threads=threads.value, gpu=gpu_layers != 0)
        instance.scheduler = Scheduler(
            model, instance.context, slots=parallel.value, spare=spare, n_ctx_seq=n_ctx_seq,
            prompt_chunk=max(32, min(options.ubatch_size, batch) // 4), projector=instance.projector,
        )
        instance.slot_states = instance.scheduler.sequences[: parallel.value]
    except BaseException:
        instance.close()
        raise
    return instance


def sequence_cells(parallel: int, n_ctx_seq: int, unified: bool) -> tuple[int, int]:
    """Spare sequences (the extra choices of ``n > 1``, extra prompts) and the KV cells of the
    context. A spare copies its prompt: free in a unified cache, where cells are shared and
    ``parallel × n_ctx_seq`` of them serve all; a whole per-sequence cache each otherwise."""
    if unified:
        return parallel, n_ctx_seq * parallel
    spare = max(1, parallel // 4)
    return spare, n_ctx_seq * (parallel + spare)


def instance_memory(weights: int, kv: int, options: LlamaCppOptions, n_vocab: int) -> int:
    return weights + kv + options.ubatch_size * n_vocab * COMPUTE_BUFFER_BYTES_PER_BATCH_TOKEN


def kv_layout(setting: bool | None, parallel: int) -> Choice:
    """Whether the sequences share one KV cache (see docs/engines/llamacpp.md for the measurements)."""
    if setting is not None:
        return Choice(setting, "kv_unified", user=True)
    if parallel == 1:
        return Choice(True, "one sequence: one KV cache")
    # measured (bench/kv_layout.py, docs/benchmarks.md): 8 sequences decoding together while each
    # holds 512 / 1536 tokens ran 29% / 41% faster with a cache each, since attention then scans
    # only the sequence's own cells; a shared prefix is copied between caches instead
    return Choice(False, f"a KV cache per sequence: attention scans only its own cells ({parallel} sequences)")


def check_grammar(grammar: str, param: str) -> None:
    """Parse a GBNF grammar (without a vocabulary); a 400 if it does not parse (llama.cpp
    writes where on stderr)."""
    import llama_cpp

    from lllms_llamacpp.native import native_error_reason, quiet_llama_logs

    quiet_llama_logs()
    sampler, reason = native_error_reason(llama_cpp.llama_sampler_init_grammar, None, grammar.encode(), b"root")
    if not sampler:
        raise InvalidRequestError(f"the grammar is not valid GBNF: {reason or 'it does not parse'}", param=param)
    llama_cpp.llama_sampler_free(sampler)


class LlamaCppEngine(Engine):
    name = "llamacpp"
    tasks = frozenset({"chat-completion", "text-completion", "embedding", "rerank"})
    default_task = "chat-completion"
    options = LlamaCppOptions
    capabilities = frozenset(
        {
            "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "penalty_window",
            "frequency_penalty", "presence_penalty", "logit_bias", "seed", "grammar",
            "n", "logprobs", "json_object", "json_schema", "tools", "echo", "suffix",
            "token_prompt", "token_input", "pooling", "vision", "reasoning_budget",
        }
    )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._gguf: dict[str, dict[str, int] | None] = {}
        """What each prepared model's GGUF header says about its memory, by model id."""

    def gpu_available(self) -> bool:
        """Whether this llama.cpp build can offload to a GPU (a CPU-only build cannot)."""
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())

    async def prepare_model(self, model: "ModelConfig", location: Path | None) -> Any:
        """The model's file (its GGUF header read for what an instance will take), and its
        multimodal projector fetched and verified as a companion file."""
        if location is not None and location.is_file():
            from lllms_llamacpp.native import gguf_facts

            self._gguf[model.id] = await trio.to_thread.run_sync(gguf_facts, str(location))
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

    def memory_estimate(self, model: "ModelConfig", location: Path | None, device: Device) -> int | None:
        """The weights, and the KV cache of the sequences and context :func:`load_instance`
        will choose, once the model's GGUF header was read; before, the file's size."""
        facts = self._gguf.get(model.id)
        if facts is None or model.task in ("embedding", "rerank"):
            return super().memory_estimate(model, location, device)
        options = options_of(model)
        parallel, context = choose_sequences(
            parallel=options.parallel,
            context_size=model.context_size,
            trained_context=facts["n_ctx_train"],
            kv_bytes_per_token=facts["kv_bytes_per_token"],
            weights_bytes=facts["weights_bytes"],
            threads=cpu_threads(device.cpu_threads).value,
            memory=device.memory_budget or default_memory_budget(),
        )
        _, n_ctx = sequence_cells(parallel.value, context.value, kv_layout(options.kv_unified, parallel.value).value)
        return instance_memory(facts["weights_bytes"], facts["kv_bytes_per_token"] * n_ctx, options, facts["n_vocab"])

    async def state_signature(self, model: "ModelConfig", instance: EngineInstance) -> dict[str, Any] | None:
        """A saved sequence state holds KV cells as this build lays them out for this model,
        its adapters and projector and the cache's layout: all of that must match to restore it."""
        if instance.scheduler is None:
            return None
        from importlib.metadata import version

        import llama_cpp

        verified = self.store.verified if self.store is not None else None

        def digests() -> tuple[str, list, str | None]:
            lora = [(model_file_digest(Path(a.path), verified), a.scale) for a in instance.options.lora]
            projector = instance.projector
            return (
                model_file_digest(Path(instance.model.path), verified),
                lora,
                model_file_digest(Path(projector.path), verified) if projector is not None else None,
            )

        model_digest, lora, projector = await trio.to_thread.run_sync(digests)
        settings = instance.context.settings
        return {
            "model_sha256": model_digest,
            "engine": f"lllms-llamacpp {version('lllms-llamacpp')}",
            "llama_cpp": llama_cpp.__version__,
            "kv_unified": settings.kv_unified,
            "sequences": None if settings.kv_unified else settings.n_seq,
            "flash_attention": settings.flash_attention,
            "lora": lora,
            "projector_sha256": projector,
        }

    async def save_states(self, instance: EngineInstance, cache, keys: list[tuple[str, ...]]) -> None:
        if instance.scheduler is not None:
            await trio.to_thread.run_sync(instance.scheduler.save_all, cache, keys)

    # --- tasks ------------------------------------------------------------------

    def check_request(self, model: "ModelConfig", request: Any) -> str | None:
        """Parse the request's grammar (or build it from its JSON schema) before it is queued,
        so that a grammar that does not parse is a 400 also for a streamed request; the task
        gets it as ``context.checked``."""
        from lllms_core.plugin_api import checked_grammar

        return checked_grammar(request, check_grammar, options_of(model).grammars)

    async def preload(self, context: TaskContext) -> None:
        instance: LlamaCppInstance = context.instance
        model = context.model
        if instance.scheduler is None:
            return

        def tokens() -> list[int] | None:
            if model.task == "chat-completion" and model.initial_messages:
                from lllms_core.plugin_api import config_messages

                prompt = instance.template.prompt(config_messages(model.initial_messages), add_generation_prompt=False)
                return instance.tokenize_rendered(prompt)
            return instance.tokenize_prompt(model.prefix) if model.prefix else None

        prompt = await trio.to_thread.run_sync(tokens, limiter=instance.limiter)
        if prompt is None:
            return
        from lllms_llamacpp.scheduler import Job

        job = Job(prompt=prompt[: instance.n_ctx_seq - 1], seq=context.slot, sampler=None, max_new=0,
                  evaluate_only=True, fresh=context.fresh, cache=context.prompt_cache)
        await self._run(instance, [job], None)

    async def chat_completion(
        self, context: TaskContext, request: ChatCompletionRequest, sink: ChunkSink
    ) -> CompletionResult:
        from lllms_core.plugin_api import ContextBudget, fit_chat, output_grammar, tool_setup

        instance = self._generator(context)
        template = instance.template

        def prepare() -> list["Job"]:
            # in a worker thread: rendering, tokenizing (again while fitting), grammars and
            # samplers take long for long prompts, and the scheduler thread only decodes
            tools = tool_setup(request, template.tool_format)
            if tools is not None and tools.forced is not None:
                grammar = output_grammar(request, tools)
            elif context.checked is not None:
                grammar = context.checked
            else:
                grammar = output_grammar(request, None, instance.options.grammars)
            budget = ContextBudget(instance.n_ctx_seq, request.token_limit, context.model.context_overflow)
            rendered, prompt = fit_chat(
                request.messages, template, tools, budget,
                lambda rendered, kept: instance.tokenize_rendered(rendered, images), instance.longest_token,
                image_marker=images.marker if images else None,
            )  # fmt: skip
            if not images and not context.fresh and not rendered.plain_spans:
                prompt = instance.keep_held_tokens(context.slot, prompt)
            return self._jobs(context, request, [prompt], grammar, tools, images.positions(prompt) if images else None)

        from lllms_llamacpp.vision import prompt_images

        images = await prompt_images(instance, context, request)
        try:
            jobs = await trio.to_thread.run_sync(prepare, limiter=instance.limiter)
            return await self._complete(instance, sink, jobs, echo=[None])
        finally:
            if images:
                images.release()

    async def text_completion(
        self, context: TaskContext, request: TextCompletionRequest, sink: ChunkSink
    ) -> CompletionResult:
        from lllms_core.plugin_api import ContextBudget, fit_tokens, output_grammar

        instance = self._generator(context)
        model = instance.model

        def prepare() -> tuple[list["Job"], list[str | None]]:
            grammar = context.checked if context.checked is not None else output_grammar(request, None, instance.options.grammars)
            budget = ContextBudget(instance.n_ctx_seq, request.token_limit, context.model.context_overflow)
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
                prompts.append(fit_tokens(tokens, budget, keep_first=model.bos >= 0 and tokens[0] == model.bos))
                echoes.append(text if request.echo else None)
            return self._jobs(context, request, prompts, grammar, None), echoes

        jobs, echoes = await trio.to_thread.run_sync(prepare, limiter=instance.limiter)
        return await self._complete(instance, sink, jobs, echo=echoes)

    async def embedding(self, context: TaskContext, request: EmbeddingRequest) -> EmbeddingResult:
        instance: LlamaCppInstance = context.instance
        model = instance.model
        if instance.embed_context is None:
            raise InvalidRequestError(f"model {context.model.id!r} is not configured for embeddings", param="model")
        if request.dimensions is not None and request.dimensions > model.n_embd:
            raise InvalidRequestError(
                f"dimensions ({request.dimensions}) exceeds the model's {model.n_embd}", param="dimensions"
            )
        pooling = request.pooling or instance.options.pooling or model.pooling or "mean"

        def run() -> tuple[list[list[float]], int]:
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
            return instance.embed(token_lists, pooling), sum(len(tokens) for tokens in token_lists)

        vectors, prompt_tokens = await trio.to_thread.run_sync(run, limiter=instance.limiter)
        return EmbeddingResult(
            embeddings=[normalize_embedding(vector, request.dimensions) for vector in vectors],
            prompt_tokens=prompt_tokens,
        )

    async def rerank(self, context: TaskContext, request: RerankRequest) -> RerankResult:
        """A reranker GGUF scores each (query, document) pair (rank pooling, see
        :mod:`lllms_llamacpp.rerank`); any other GGUF ranks by the cosine similarity of embeddings."""
        instance: LlamaCppInstance = context.instance
        if instance.embed_context is None:
            raise InvalidRequestError(f"model {context.model.id!r} is not configured for reranking", param="model")
        if not instance.embed_context.settings.rank:
            return await cosine_rerank(self, context, request)
        from lllms_llamacpp.rerank import rank

        scores, tokens = await trio.to_thread.run_sync(
            rank, instance.model, instance.embed_context, request.query, request.texts, instance.n_ctx_seq,
            limiter=instance.limiter,
        )  # fmt: skip
        return RerankResult(scores=scores, prompt_tokens=tokens)

    async def tokenize(self, context: TaskContext, request: TokenizeRequest) -> TokenizeResult:
        instance: LlamaCppInstance = context.instance
        return await trio.to_thread.run_sync(self._tokenize, instance, request, limiter=instance.limiter)

    def _tokenize(self, instance: LlamaCppInstance, request: TokenizeRequest) -> TokenizeResult:
        model = instance.model
        if request.messages is not None:
            if instance.template is None:
                raise InvalidRequestError(f"model {request.model!r} has no chat template", param="messages")
            from lllms_core.plugin_api import tool_setup

            tools = tool_setup(request, instance.template.tool_format)
            tokens = instance.tokenize_rendered(instance.template.prompt(request.messages, tools))
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

    def _jobs(
        self, context: TaskContext, request: Any, prompts: list[list[int]], grammar: str | None,
        tools: "ToolSetup | None", media: dict | None = None,
    ) -> list["Job"]:
        """``n`` jobs per prompt, with their samplers (which parse the grammar); in a worker
        thread. ``media``: where the first prompt's images are (see :mod:`lllms_llamacpp.vision`)."""
        from lllms_core.plugin_api import CompletionOutput

        from lllms_llamacpp.native import Sampler
        from lllms_llamacpp.scheduler import Job, TextStream, release_media

        instance: LlamaCppInstance = context.instance
        model = instance.model
        params = self._sampling(instance, request, grammar)
        seed = request.seed if request.seed is not None else random.getrandbits(32)
        top = self._top_logprobs(request)
        shown = instance.shown_tokens(tools.format) if tools is not None else frozenset()
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
                        stream=TextStream(model, CompletionOutput(request.stop_list, tools), shown),
                        after=first,
                        fresh=context.fresh and index == 0,
                        thinking=ThinkingBudget.for_request(instance.chat_template, request),
                        cache=context.prompt_cache if index == 0 else None,
                        previous_key=context.previous_key,
                    )
                    if media and number == 0:
                        job.media = dict(media)
                        for owner in {id(m.owner): m.owner for m in media.values()}.values():
                            owner.acquire()
                    first = first or job
                    jobs.append(job)
        except BaseException:
            for job in jobs:
                job.sampler.close()
                release_media(job)
            raise
        return jobs

    async def _complete(self, instance: LlamaCppInstance, sink: ChunkSink, jobs: list["Job"], echo: list[str | None]) -> CompletionResult:
        """Run the jobs (``n`` choices of each prompt, as parallel sequences)."""
        choices = len(jobs) // len(echo)
        for job in jobs:
            text = echo[job.index // choices]
            if text:
                sink.send_nowait(CompletionChunk(index=job.index, text=text))

        def on_chunk(index: int, piece, token_logprobs: list | None) -> None:
            sink.send_nowait(piece.chunk(index, token_logprobs))

        results = await self._run(instance, jobs, on_chunk)
        finish_reasons = []
        usage = Usage()
        for job in jobs:
            reason, (prompt_tokens, completion_tokens, cached) = results[job.index]
            if job.after is None:
                usage.prompt_tokens += prompt_tokens
                usage.cached_tokens += cached
            usage.completion_tokens += completion_tokens
            finish_reasons.append(job.stream.output.finish_reason(reason))
        await trio.lowlevel.checkpoint()
        stops = [job.stream.output.stop_sequence for job in jobs]
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
