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

import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

import jinja2
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
    AssistantMessage,
    ChatCompletionRequest,
    CompletionChunk,
    CompletionResult,
    ContextLengthExceededError,
    DeveloperMessage,
    InvalidRequestError,
    RefusalPart,
    StopStringFilter,
    SystemMessage,
    TextCompletionRequest,
    TextPart,
    TokenLogprob,
    ToolCallDelta,
    ToolMessage,
    TopLogprob,
    Usage,
    UserMessage,
    check_token_ids,
    common_prefix,
    message_text,
    requested_logits_processors,
)
from lllms_transformers import structured, vision


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
        self.template = (getattr(processor, "chat_template", None) if processor else None) or tokenizer.chat_template or ""
        self.template_has_tools = "tools" in self.template
        self.grammars = structured.GrammarCompiler(self)
        self.sampling_defaults = model_sampling_defaults(model.generation_config)

    def close(self) -> None:
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def info(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.model.dtype).removeprefix("torch."), "context_size": self.context_size}


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


class IncrementalDecoder:
    """Turns tokens into text as they come, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]


class TextOutput:
    """Plain text: stop strings are cut off and never sent."""

    def __init__(self, stops: list[str]):
        self.filter = StopStringFilter(stops)
        self.stopped = False
        self.called_tools = False

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        emitted, self.stopped = self.filter.push(text)
        return emitted, []

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        return self.filter.flush(), []


class TokenHandler(StoppingCriteria):
    """Called by ``generate`` after each new token: decode, send, decide whether to stop.

    Cancellation (``trio.Cancelled`` from the sink) stops generation cleanly, so the KV
    cache stays consistent; the caller re-raises it once ``generate`` returned.
    """

    def __init__(self, generator: TextGenerator, output, sink, index: int, recorder: LogprobRecorder | None, top: int):
        self.generator = generator
        self.decoder = IncrementalDecoder(generator.tokenizer)
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
                self._send(*self.output.finish(), None)
            else:
                text, calls = self.output.feed(self.decoder.add(token))
                self._send(text, calls, self._logprob(token))
                self.ended = self.output.stopped
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

    def _send(self, text: str, calls: list[ToolCallDelta], logprob: TokenLogprob | None) -> None:
        if text or calls or logprob:
            self.sink.send_from_thread(
                CompletionChunk(index=self.index, text=text, tool_calls=calls or None, logprobs=[logprob] if logprob else None)
            )

    def flush(self) -> None:
        """Send what the output held back when generation ended on the token limit."""
        if not self.ended and self.cancelled is None:
            self._send(*self.output.finish(), None)


# --- one choice -----------------------------------------------------------------------


def generate_choice(
    generator: TextGenerator,
    state: SlotState,
    prompt: list[int],
    sampling: Sampling,
    grammar,
    output,
    sink,
    index: int,
    model_inputs: dict | None = None,
) -> tuple[str, int, int]:
    """Generate one choice in a worker thread; return (finish reason, completion tokens, cached tokens).
    ``model_inputs``: a vision-language model's image inputs (``pixel_values``...); the prompt's
    image tokens do not tell images apart, so such a prompt reuses no cache and leaves none."""
    model = generator.model
    room = generator.context_size - len(prompt)
    if room <= 0:
        raise ContextLengthExceededError(
            f"the prompt has {len(prompt)} tokens; the model's context holds {generator.context_size}", param="messages"
        )
    max_new = min(sampling.max_tokens or room, room)

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

    handler = TokenHandler(generator, output, sink, index, recorder, sampling.top_logprobs or 0)
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
    if not handler.ended:
        reason = "length"
    elif output.called_tools:
        reason = "tool_calls"
    else:
        reason = "stop"
    return reason, handler.count, reused


def _slot_state(context) -> SlotState:
    state = context.instance.slot_states[context.slot]
    if not isinstance(state, SlotState):
        state = context.instance.slot_states[context.slot] = SlotState()
    return state


async def _run_choices(
    context, prompt: list[int], sampling, grammar, make_output, sink, first_index: int, choices: int, model_inputs=None
):
    """Run ``choices`` choices of one prompt; return (finish reasons by index, usage)."""
    generator: TextGenerator = context.instance.loaded
    state = _slot_state(context)
    reasons: dict[int, str] = {}
    completion_tokens = cached = 0
    # the last choice run stays in the slot's cache: run the first choice last, as the
    # pool's context identity of the slot follows choice 0
    for index in reversed(range(first_index, first_index + choices)):
        reason, tokens, reused = await trio.to_thread.run_sync(
            generate_choice, generator, state, prompt, sampling, grammar, make_output(), sink, index, model_inputs,
            limiter=context.instance.limiter,
        )  # fmt: skip
        reasons[index] = reason
        completion_tokens += tokens
        if index == first_index:
            cached = reused
    return reasons, Usage(prompt_tokens=len(prompt), completion_tokens=completion_tokens, cached_tokens=cached)


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
    if model.initial_messages and generator.template:
        messages = [{"role": message.role, "content": message.content} for message in model.initial_messages]
        if generator.processor is not None:
            messages = vision.structured(messages)
        text = generator.tokenizer.apply_chat_template(messages, chat_template=generator.template, tokenize=False)
        tokens = generator.tokenizer(text, add_special_tokens=False)["input_ids"]
    elif model.prefix:
        tokens = generator.tokenizer(model.prefix)["input_ids"]
    else:
        return
    await trio.to_thread.run_sync(preload_slot, generator, _slot_state(context), tokens, limiter=context.instance.limiter)


# --- chat -------------------------------------------------------------------------------


def _text_only(message, engine, generator: TextGenerator) -> str:
    content = message.content
    if isinstance(content, list) and any(not isinstance(part, (TextPart, RefusalPart)) for part in content):
        if not (generator.processor is not None and isinstance(message, UserMessage)):
            raise engine.unsupported("messages", "image or audio message content with this model")
    return message_text(message)


def template_messages(engine, generator: TextGenerator, request: ChatCompletionRequest, tools_active: bool) -> list[dict]:
    """The request's messages as the chat template expects them. Tool calls and results
    go in the template's own form when it knows tools, else as tagged text. A vision-language
    model's template gets every content as a list of parts, images in their place."""
    messages: list[dict] = []
    for message in request.messages:
        text = _text_only(message, engine, generator)
        if isinstance(message, (SystemMessage, DeveloperMessage)):
            messages.append({"role": "system", "content": text})
        elif isinstance(message, UserMessage):
            messages.append({"role": "user", "content": vision.content_parts(message) if generator.processor else text})
        elif isinstance(message, AssistantMessage):
            calls = message.tool_calls or []
            if calls and generator.template_has_tools:
                messages.append({
                    "role": "assistant",
                    "content": text,
                    "tool_calls": [
                        {"type": "function", "id": call.id, "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                        for call in calls
                    ],
                })  # fmt: skip
            else:
                messages.append({"role": "assistant", "content": text + "".join(structured.call_text(call) for call in calls)})
        elif isinstance(message, ToolMessage):
            if generator.template_has_tools:
                messages.append({"role": "tool", "content": text, "tool_call_id": message.tool_call_id})
            else:
                messages.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
    if tools_active and not generator.template_has_tools:
        instructions = structured.tool_instructions(request.tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + instructions}
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return vision.structured(messages) if generator.processor else messages


def _arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def chat_prompt(
    engine, generator: TextGenerator, request: ChatCompletionRequest, tools_active: bool, images=None
) -> tuple[list[int], dict | None]:
    """The prompt's tokens, and a vision-language model's image inputs (None without images)."""
    messages = template_messages(engine, generator, request, tools_active)
    extra = {}
    if tools_active and generator.template_has_tools:
        extra["tools"] = [{"type": "function", "function": structured.function_dict(tool)} for tool in request.tools]
    if not generator.template:
        raise InvalidRequestError("this model has no chat template; use text completions", param="messages")
    try:
        text = generator.tokenizer.apply_chat_template(
            messages, chat_template=generator.template, add_generation_prompt=True, tokenize=False, **extra
        )
    except jinja2.TemplateError as error:  # templates raise for what they refuse (roles, order)
        raise InvalidRequestError(f"the model's chat template refused the messages: {error}", param="messages") from None
    if generator.processor is not None and images:
        return vision.model_inputs(generator, text, [images[url].pixels for url in vision.image_urls(request)])
    return generator.tokenizer(text, add_special_tokens=False)["input_ids"], None


async def chat_completion(engine, context, request: ChatCompletionRequest, sink) -> CompletionResult:
    generator: TextGenerator = context.instance.loaded
    tools_active = bool(request.tools) and request.tool_choice != "none"
    top = None
    if request.logprobs or request.top_logprobs:
        top = request.top_logprobs or 0
    sampling = _sampling(engine, request, generator, top)

    def prepare() -> tuple[tuple[list[int], dict | None], Any]:
        # in the instance's thread: the tokenizer is not shared between threads
        prompt = chat_prompt(engine, generator, request, tools_active, context.images)
        return prompt, generator.grammars.for_chat(request, tools_active)

    (prompt, model_inputs), grammar = await trio.to_thread.run_sync(prepare, limiter=context.instance.limiter)
    if tools_active:
        def make_output():
            return structured.ToolCallOutput(sampling.stops)
    else:
        def make_output():
            return TextOutput(sampling.stops)
    reasons, usage = await _run_choices(
        context, prompt, sampling, grammar, make_output, sink, 0, request.choices, model_inputs
    )
    return CompletionResult(finish_reasons=[reasons[i] for i in range(request.choices)], usage=usage)


# --- text -------------------------------------------------------------------------------


async def text_completion(engine, context, request: TextCompletionRequest, sink) -> CompletionResult:
    generator: TextGenerator = context.instance.loaded
    tokenizer = generator.tokenizer
    sampling = _sampling(engine, request, generator, request.logprobs)

    def tokens_of(prompt: str | list[int]) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            tokens = tokenizer(prompt)["input_ids"]
            # an empty prompt starts from the beginning of a text, as llama.cpp's does
            return tokens or [generator.start_token_id], prompt
        check_token_ids(prompt, generator.model.config.vocab_size, "prompt")
        return list(prompt), tokenizer.decode(prompt)

    def prepare() -> tuple[list[tuple[list[int], str]], Any]:
        # in the instance's thread: the tokenizer is not shared between threads
        prompts = [tokens_of(prompt) for prompt in request.prompts]
        return prompts, generator.grammars.for_grammar(request.grammar) if request.grammar else None

    prompts, grammar = await trio.to_thread.run_sync(prepare, limiter=context.instance.limiter)
    reasons: dict[int, str] = {}
    usage = Usage()
    for number, (tokens, text) in enumerate(prompts):
        first = number * request.choices
        if request.echo:
            for index in range(first, first + request.choices):
                await sink.send(CompletionChunk(index=index, text=text))
        choice_reasons, choice_usage = await _run_choices(
            context, tokens, sampling, grammar, lambda: TextOutput(sampling.stops), sink, first, request.choices
        )
        reasons.update(choice_reasons)
        usage = usage + choice_usage
    return CompletionResult(finish_reasons=[reasons[i] for i in range(len(reasons))], usage=usage)
