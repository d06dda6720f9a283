"""Chat and text completion with a causal language model.

``model.generate`` runs in a worker thread bounded by the instance's limiter.
Sampling is transformers' own logits processors, built here in a fixed order
(penalty, bias, grammar, plugin samplers, then temperature / top-k / top-p /
min-p), followed by a seeded sampler with its own ``torch.Generator`` so that
``seed`` does not depend on the process-wide random state. A stopping criterion
receives each new token: it decodes it, sends it to trio and stops generation on a stop
string or once the request is cancelled.

Each slot keeps the tokens it evaluated and their KV cache (a ``DynamicCache``).
The next request in that slot reuses the cache for the common token prefix
(cropped to it) and evaluates only the rest of its prompt.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

import msgspec
import torch
import trio
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lllms_core.plugin_api import (
    ChatCompletionRequest,
    ChatTemplate,
    CompletionChunk,
    CompletionOutput,
    CompletionResult,
    ContextBudget,
    InvalidRequestError,
    RenderedPrompt,
    TextCompletionRequest,
    ThinkingBudget,
    TokenLogprob,
    TopLogprob,
    Usage,
    check_token_ids,
    common_prefix,
    config_messages,
    fit_chat,
    fit_tokens,
    requested_logits_processors,
    tool_setup,
)
from lllms_transformers import states, structured, vision


class TextGenerator:
    """A loaded causal language model, its tokenizer and its grammar compiler; for a
    vision-language model also its ``processor``, which turns a prompt and its images into
    the model's inputs (see :mod:`lllms_transformers.vision`)."""

    def __init__(self, model, tokenizer, device: torch.device, context_size: int, processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.device = device
        self.context_size = context_size
        self.vocab_size = model.config.get_text_config().vocab_size
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.stop_token_ids = eos
        self.start_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos[0]
        """What a text starts with: the model's BOS token, else its first end-of-text token."""
        pad = model.generation_config.pad_token_id
        self.pad_token_id = pad if pad is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
        added = tokenizer.added_tokens_decoder
        self.special_ids = frozenset(token for token, added_token in added.items() if added_token.special)
        """Added tokens that decode to nothing (unless a tool format's marker)."""
        variables = {name: value for name, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
        source = (getattr(processor, "chat_template", None) if processor else None) or tokenizer.chat_template
        self.template = ChatTemplate(
            source, special_tokens=[token.content for token in added.values()], variables=variables,
            content_parts=processor is not None,
        ) if source else None
        self.grammars = structured.GrammarCompiler(self)
        self.sampling_defaults = model_sampling_defaults(model.generation_config)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def info(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.model.dtype).removeprefix("torch."), "context_size": self.context_size}

    def tokenize_rendered(self, prompt: RenderedPrompt) -> list[int]:
        """Tokens of a rendered chat: the client's text (plain spans) never becomes special tokens."""
        tokens: list[int] = []
        for text, special in prompt.pieces():
            tokens += self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]
        return tokens

    @functools.cached_property
    def longest_token(self) -> int:
        """At least the byte length of the vocabulary's longest token (its written form is
        as long as the bytes it stands for, or longer)."""
        return max(len(token.encode()) for token in self.tokenizer.get_vocab())

    def shown_tokens(self, tool_format) -> frozenset[int]:
        """The special tokens that spell a tool format's markers: generated, they show as text."""
        shown = set()
        for marker in tool_format.marker_texts:
            tokens = self.tokenizer(marker, add_special_tokens=False)["input_ids"]
            if len(tokens) == 1:
                shown.add(tokens[0])
        return frozenset(shown)


@dataclass
class SlotState:
    """What a slot evaluated: tokens and their KV cache."""

    tokens: list[int] = field(default_factory=list)
    cache: Any = None


@dataclass
class Sampling:
    temperature: float
    top_k: int | None
    top_p: float | None
    min_p: float | None
    repeat_penalty: float | None
    frequency_penalty: float
    presence_penalty: float
    logit_bias: list[list]
    seed: int | None
    max_tokens: int | None
    stops: list[str]
    top_logprobs: int | None
    """None: no logprobs; else how many alternatives per token."""
    plugin_processors: list[Callable[[], Callable]]
    """Builders of the requested plugin samplers' ``fn(token_ids, logits) -> logits``, one call per choice."""
    thinking: Callable[[], ThinkingBudget | None] = lambda: None
    """A new thinking budget for each choice (None: its thinking is unbounded)."""


SAMPLING_DEFAULTS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "repeat_penalty": "repetition_penalty"}
"""Request parameter → the model's ``generation_config.json`` field that gives its default."""


def model_sampling_defaults(generation_config) -> dict[str, float]:
    """The sampling settings a model's authors recommend (when its generation_config.json
    samples); parameters a request leaves unset take them."""
    written = generation_config.to_diff_dict()
    if not written.get("do_sample"):
        return {}
    return {parameter: written[name] for parameter, name in SAMPLING_DEFAULTS.items() if written.get(name) is not None}


def _sampling(engine, request, generator: "TextGenerator", top_logprobs: int | None) -> Sampling:
    vocab_size = generator.vocab_size
    unset = {name: value for name, value in generator.sampling_defaults.items() if getattr(request, name) is None}
    if unset:
        request = msgspec.structs.replace(request, **unset)
    bias = []
    for key, value in (request.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError(f"logit_bias keys must be token ids, not {key!r}", param="logit_bias") from None
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(f"logit_bias token {token} is not in the vocabulary", param="logit_bias")
        bias.append([[token], float(value)])
    return Sampling(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_k=request.top_k or None,
        top_p=request.top_p if request.top_p is not None and request.top_p < 1 else None,
        min_p=request.min_p or None,
        repeat_penalty=request.repeat_penalty if request.repeat_penalty not in (None, 1.0) else None,
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        logit_bias=bias,
        seed=request.seed,
        max_tokens=request.token_limit,
        stops=request.stop_list,
        top_logprobs=top_logprobs,
        plugin_processors=requested_logits_processors(engine.samplers, request),
        thinking=lambda: ThinkingBudget.for_request(generator.template.source if generator.template else None, request),
    )


# --- logits processors and the token handler -------------------------------------------


class OccurrencePenalty(LogitsProcessor):
    """OpenAI's ``frequency_penalty`` and ``presence_penalty``: lower the logits of tokens
    already generated in this completion (the prompt does not count), by ``frequency``
    per occurrence plus ``presence`` once."""

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.prompt_length = prompt_length
        self.frequency = frequency
        self.presence = presence

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class PluginSamplers(LogitsProcessor):
    """Plugin samplers' logits processors, in the registry's order. Each gets a sequence so
    far as a ``list[int]`` and its next token's logits as a 1-D float32 tensor over the
    vocabulary, and returns the logits to use."""

    def __init__(self, functions: list[Callable]):
        self.functions = functions

    def __call__(self, input_ids, scores):
        rows = []
        for token_ids, logits in zip(input_ids.tolist(), scores):
            for function in self.functions:
                logits = function(token_ids, logits)
            rows.append(logits)
        return torch.stack(rows)


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-probabilities of the step's distribution (after penalties, bias,
    grammar and plugin samplers, before temperature and truncation), for the token handler
    to report."""

    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        self.last = torch.log_softmax(scores[0].float(), dim=-1)
        return scores


class SeededSampler(LogitsProcessor):
    """Samples from the warped distribution with its own generator and leaves only the
    chosen token, so that greedy ``generate`` picks it: repeatable for a seed, and
    independent of other threads using torch's global random state."""

    def __init__(self, seed: int):
        self.seed = seed
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids, scores):
        if self.generator is None:
            self.generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        probabilities = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probabilities, num_samples=1, generator=self.generator)
        only = torch.full_like(scores, -float("inf"))
        return only.scatter_(1, chosen, 0.0)


class ThinkingLimit(LogitsProcessor):
    """Once a choice's thinking budget is spent, forces the tokens of the closing tag: the
    last processor, it overrides whatever was chosen."""

    def __init__(self, budget: ThinkingBudget, tokenizer, prompt_length: int):
        self.budget = budget
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.forced: list[int] = []

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_length:
            self.budget.advance(self.tokenizer.decode(input_ids[0, -1:]))
        if self.budget.exhausted:
            self.budget.closed()
            self.forced = self.tokenizer(self.budget.closing, add_special_tokens=False)["input_ids"]
        if not self.forced:
            return scores
        only = torch.full_like(scores, -float("inf"))
        return only.index_fill_(1, torch.tensor([self.forced.pop(0)], device=scores.device), 0.0)


class IncrementalDecoder:
    """Turns tokens into text as they come, holding back incomplete UTF-8 sequences.
    Special tokens decode to nothing, except the ``shown`` ones (a tool format's markers)."""

    def __init__(self, tokenizer, hidden: frozenset[int]):
        self.tokenizer = tokenizer
        self.hidden = hidden
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        if token in self.hidden:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=False)
        now = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=False)
        if now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]


class TokenHandler(StoppingCriteria):
    """Called by ``generate`` after each new token: decode, send, decide whether to stop.

    Cancellation (``trio.Cancelled`` from the sink) stops generation cleanly, so the KV
    cache stays consistent; the caller re-raises it once ``generate`` returned.
    """

    def __init__(self, generator: TextGenerator, output: CompletionOutput, shown: frozenset[int], sink, index: int,
                 recorder: LogprobRecorder | None, top: int):
        self.generator = generator
        self.decoder = IncrementalDecoder(generator.tokenizer, generator.special_ids - shown)
        self.output = output
        self.sink = sink
        self.index = index
        self.recorder = recorder
        self.top = top
        self.count = 0
        self.ended = False
        """True once an end-of-generation token or a stop string ended the choice."""
        self.cancelled: BaseException | None = None

    def __call__(self, input_ids, scores, **kwargs):
        token = int(input_ids[0, -1])
        self.count += 1
        try:
            trio.from_thread.check_cancelled()
            if token in self.generator.stop_token_ids:
                self.ended = True
                self._send(self.output.flush(), None)
            else:
                piece, self.ended = self.output.push(self.decoder.add(token))
                self._send(piece, self._logprob(token))
        except trio.Cancelled as cancelled:
            self.cancelled = cancelled
        done = self.ended or self.cancelled is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def _logprob(self, token: int) -> TokenLogprob | None:
        if self.recorder is None or self.recorder.last is None:
            return None
        decode = self.generator.tokenizer.decode
        logprobs = self.recorder.last
        text = decode([token])
        top = []
        if self.top:
            values, ids = torch.topk(logprobs, self.top)
            top = [
                TopLogprob(token=(piece := decode([int(i)])), logprob=float(v), bytes=list(piece.encode()))
                for v, i in zip(values.tolist(), ids.tolist())
            ]
        return TokenLogprob(token=text, logprob=float(logprobs[token]), bytes=list(text.encode()), top_logprobs=top)

    def _send(self, piece, logprob: TokenLogprob | None) -> None:
        if piece or logprob:
            self.sink.send_from_thread(piece.chunk(self.index, [logprob] if logprob else None))

    def flush(self) -> None:
        """Send what the output held back when generation ended on the token limit."""
        if not self.ended and self.cancelled is None:
            self._send(self.output.flush(), None)


# --- one choice -----------------------------------------------------------------------


def generate_choice(
    generator: TextGenerator,
    state: SlotState,
    prompt: list[int],
    sampling: Sampling,
    grammar,
    tools,
    sink,
    index: int,
    model_inputs: dict | None = None,
) -> tuple[str, int, int, str | None]:
    """Generate one choice in a worker thread; return (finish reason, completion tokens, cached
    tokens, the stop string that ended it). ``model_inputs``: a vision-language model's image
    inputs (``pixel_values``...); the prompt's image tokens do not tell images apart, so such a
    prompt reuses no cache and leaves none."""
    model = generator.model
    room = generator.context_size - len(prompt)  # at least one: the core's overflow policy fitted the prompt
    max_new = min(sampling.max_tokens or room, room)
    output = CompletionOutput(sampling.stops, tools)
    shown = generator.shown_tokens(tools.format) if tools is not None else frozenset()

    # reuse the slot's cache for the common prefix; at least one prompt token is evaluated
    reused = min(common_prefix(state.tokens, prompt), len(prompt) - 1) if not model_inputs else 0
    cache = state.cache
    if cache is None or reused == 0:
        cache, reused = DynamicCache(config=model.config), 0
    elif cache.get_seq_length() > reused:
        cache.crop(reused - cache.get_seq_length())
    state.tokens, state.cache = [], None  # until this generation ends well

    processors = LogitsProcessorList()
    if sampling.repeat_penalty:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repeat_penalty))
    if sampling.frequency_penalty or sampling.presence_penalty:
        processors.append(OccurrencePenalty(len(prompt), sampling.frequency_penalty, sampling.presence_penalty))
    if sampling.logit_bias:
        processors.append(SequenceBiasLogitsProcessor(sampling.logit_bias))
    if grammar is not None:
        processors.append(structured.logits_processor(grammar))
    if sampling.plugin_processors:
        processors.append(PluginSamplers([build() for build in sampling.plugin_processors]))
    recorder = LogprobRecorder() if sampling.top_logprobs is not None else None
    if recorder is not None:
        processors.append(recorder)
    if sampling.temperature > 0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p:
            processors.append(TopPLogitsWarper(sampling.top_p))
        if sampling.min_p:
            processors.append(MinPLogitsWarper(sampling.min_p))
        seed = sampling.seed + index if sampling.seed is not None else secrets.randbits(63)
        processors.append(SeededSampler(seed))
    thinking = sampling.thinking()
    if thinking is not None:
        processors.append(ThinkingLimit(thinking, generator.tokenizer, len(prompt)))

    handler = TokenHandler(generator, output, shown, sink, index, recorder, sampling.top_logprobs or 0)
    config = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=generator.stop_token_ids,
        pad_token_id=generator.pad_token_id,
    )
    input_ids = torch.tensor([prompt], device=generator.device)
    with torch.inference_mode():
        sequences = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            cache=cache,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([handler]),
            **(model_inputs or {}),
        )
    # generate returned normally (also when cancelled): the cache matches these tokens
    kept = cache.get_seq_length()
    if not model_inputs:
        state.tokens, state.cache = sequences[0].tolist()[:kept], cache
    if handler.cancelled is not None:
        raise handler.cancelled
    handler.flush()
    return output.finish_reason("stop" if handler.ended else "length"), handler.count, reused, output.stop_sequence


def _slot_state(context) -> SlotState:
    state = context.instance.slot_states[context.slot]
    if not isinstance(state, SlotState):
        state = context.instance.slot_states[context.slot] = SlotState()
    return state


async def _run_choices(
    context, prompt: list[int], sampling, grammar, tools, sink, first_index: int, choices: int, model_inputs=None
):
    """Run ``choices`` choices of one prompt; return (finish reason and stop string by index, usage)."""
    generator: TextGenerator = context.instance.loaded
    state = _slot_state(context)
    await trio.to_thread.run_sync(
        states.prepare_slot, state, prompt, context.prompt_cache, context.previous_key, limiter=context.instance.limiter
    )
    ends: dict[int, tuple[str, str | None]] = {}
    completion_tokens = cached = 0
    # the last choice run stays in the slot's cache: run the first choice last, as the
    # pool's context identity of the slot follows choice 0
    for index in reversed(range(first_index, first_index + choices)):
        reason, tokens, reused, stop = await trio.to_thread.run_sync(
            generate_choice, generator, state, prompt, sampling, grammar, tools, sink, index, model_inputs,
            limiter=context.instance.limiter,
        )  # fmt: skip
        ends[index] = (reason, stop)
        completion_tokens += tokens
        if index == first_index:
            cached = reused
    return ends, Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens, cached_tokens=cached)


def _result(ends: dict[int, tuple[str, str | None]], usage: Usage) -> CompletionResult:
    order = sorted(ends)
    return CompletionResult(
        finish_reasons=[ends[i][0] for i in order], stop_sequences=[ends[i][1] for i in order], usage=usage
    )


def preload_slot(generator: TextGenerator, state: SlotState, tokens: list[int]) -> None:
    """Evaluate ``tokens`` into the slot's cache, for requests that start with them."""
    cache = DynamicCache(config=generator.model.config)
    with torch.inference_mode():
        generator.model(input_ids=torch.tensor([tokens], device=generator.device), cache=cache, use_cache=True)
    state.tokens, state.cache = list(tokens), cache


async def preload(context) -> None:
    """The model's ``initial_messages`` (through the chat template) or ``prefix`` into the slot."""
    generator: TextGenerator = context.instance.loaded
    model = context.model

    def run() -> None:
        if model.initial_messages and generator.template is not None:
            prompt = generator.template.prompt(config_messages(model.initial_messages), add_generation_prompt=False)
            tokens = generator.tokenize_rendered(prompt)
        elif model.prefix:
            tokens = generator.tokenizer(model.prefix)["input_ids"]
        else:
            return
        preload_slot(generator, _slot_state(context), tokens)

    await trio.to_thread.run_sync(run, limiter=context.instance.limiter)


# --- chat ---------------------------------------------------------------------------------


async def chat_completion(engine, context, request: ChatCompletionRequest, sink) -> CompletionResult:
    generator: TextGenerator = context.instance.loaded
    template = generator.template
    if template is None:
        raise InvalidRequestError("this model has no chat template; use text completions", param="messages")
    top = None
    if request.logprobs or request.top_logprobs:
        top = request.top_logprobs or 0

    def prepare():
        # in the instance's thread: the tokenizer is not shared between threads, and
        # rendering, tokenizing (again while fitting) and grammars take long for long prompts
        tools = tool_setup(request, template.tool_format)
        grammar = generator.grammars.for_request(request, tools, context.checked)
        budget = ContextBudget(generator.context_size, request.token_limit, context.model.context_overflow)
        image_inputs: dict[str, dict] = {}

        def tokenize(rendered, kept) -> list[int]:
            sources = vision.image_urls(kept) if generator.processor is not None else []
            if not sources:
                return generator.tokenize_rendered(rendered)
            # the processor puts each image's tokens in the text (client text is not kept plain here)
            tokens, image_inputs[rendered.text] = vision.model_inputs(
                generator, rendered.text, [context.image(source).pixels for source in sources]
            )
            return tokens

        rendered, prompt = fit_chat(request.messages, template, tools, budget, tokenize, generator.longest_token)
        return prompt, image_inputs.get(rendered.text), grammar, tools, _sampling(engine, request, generator, top)

    prompt, model_inputs, grammar, tools, sampling = await trio.to_thread.run_sync(prepare, limiter=context.instance.limiter)
    ends, usage = await _run_choices(context, prompt, sampling, grammar, tools, sink, 0, request.choices, model_inputs)
    return _result(ends, usage)


# --- text -------------------------------------------------------------------------------


async def text_completion(engine, context, request: TextCompletionRequest, sink) -> CompletionResult:
    generator: TextGenerator = context.instance.loaded
    tokenizer = generator.tokenizer

    def tokens_of(prompt: str | list[int]) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            tokens = tokenizer(prompt)["input_ids"]
            # an empty prompt starts from the beginning of a text, as llama.cpp's does
            return tokens or [generator.start_token_id], prompt
        check_token_ids(prompt, generator.model.config.vocab_size, "prompt")
        return list(prompt), tokenizer.decode(prompt)

    def prepare():
        # in the instance's thread: the tokenizer is not shared between threads
        budget = ContextBudget(generator.context_size, request.token_limit, context.model.context_overflow)
        prompts = []
        for prompt in request.prompts:
            tokens, text = tokens_of(prompt)
            first = tokens[:1] == [tokenizer.bos_token_id] and tokenizer.bos_token_id is not None
            prompts.append((fit_tokens(tokens, budget, keep_first=first), text))
        grammar = generator.grammars.for_request(request, None, context.checked)
        return prompts, grammar, _sampling(engine, request, generator, request.logprobs)

    prompts, grammar, sampling = await trio.to_thread.run_sync(prepare, limiter=context.instance.limiter)
    ends: dict[int, tuple[str, str | None]] = {}
    usage = Usage()
    for number, (tokens, text) in enumerate(prompts):
        first = number * request.choices
        if request.echo:
            for index in range(first, first + request.choices):
                await sink.send(CompletionChunk(index=index, text=text))
        choice_ends, choice_usage = await _run_choices(context, tokens, sampling, grammar, None, sink, first, request.choices)
        ends.update(choice_ends)
        usage = usage + choice_usage
    return _result(ends, usage)
