"""The sampler registry's built-in samplers, and the check that refuses what an
engine cannot do."""

from __future__ import annotations

import functools
from typing import Any, Callable

import msgspec

from lllms_core.errors import UnsupportedParameterError
from lllms_core.hookspecs import hookimpl


class Sampler(msgspec.Struct, frozen=True, kw_only=True):
    """A named sampler and the request parameters that ask for it.

    ``logits_processor``: for plugin samplers, a factory ``(value, request) -> fn(token_ids, logits) -> logits``
    that engines with ``logits_processors = True`` apply at each step: ``token_ids`` is the
    sequence so far (prompt and generated tokens) as a ``list[int]``, ``logits`` the next
    token's logits (for transformers a 1-D float32 torch tensor, one value per token id of
    the model's vocabulary); ``fn`` returns the logits to use. Built-in samplers leave it
    ``None``: engines implement those natively.
    """

    name: str
    parameters: tuple[str, ...]
    description: str = ""
    logits_processor: Callable[..., Callable] | None = None


BUILTIN_SAMPLERS = (
    Sampler(name="temperature", parameters=("temperature",), description="Scale logits; 0 is greedy."),
    Sampler(name="top_k", parameters=("top_k",), description="Keep the k most likely tokens."),
    Sampler(name="top_p", parameters=("top_p",), description="Nucleus sampling."),
    Sampler(name="min_p", parameters=("min_p",), description="Drop tokens below min_p × the top probability."),
    Sampler(name="repeat_penalty", parameters=("repeat_penalty",), description="Divide logits of recent tokens."),
    Sampler(
        name="penalty_window",
        parameters=("repeat_last_n", "repeat_penalty_num"),
        description="How many recent tokens the penalties look back at (-1: the whole context).",
    ),
    Sampler(name="frequency_penalty", parameters=("frequency_penalty",), description="Penalise by count."),
    Sampler(name="presence_penalty", parameters=("presence_penalty",), description="Penalise by presence."),
    Sampler(name="logit_bias", parameters=("logit_bias",), description="Add a bias to given tokens."),
    Sampler(name="seed", parameters=("seed",), description="Make sampling repeatable."),
    Sampler(name="grammar", parameters=("grammar",), description="Constrain output with a GBNF grammar."),
)

COMPLETION_PARAMETERS = frozenset(
    parameter for sampler in BUILTIN_SAMPLERS for parameter in sampler.parameters
) | {"max_tokens", "stop", "n"}


@hookimpl
def register_samplers(register):
    for sampler in BUILTIN_SAMPLERS:
        register(sampler)


def _requested(request: Any, parameter: str) -> Any:
    value = getattr(request, parameter, None)
    if value is None:
        value = request.plugin_parameters.get(parameter) if hasattr(request, "plugin_parameters") else None
    return value


def requested_logits_processors(samplers: dict[str, Sampler], request: Any) -> list[Callable[[], Callable]]:
    """The logits processors of the plugin samplers ``request`` asks for, as builders that take
    no arguments: an engine calls one per generated sequence, so a processor that keeps state
    starts afresh for each choice. A sampler is asked for when the request sets any of its
    parameters; its factory gets the value of the first one set (and reads any others from
    ``request.plugin_parameters``)."""
    builders = []
    for sampler in samplers.values():
        if sampler.logits_processor is None:
            continue
        values = [value for parameter in sampler.parameters if (value := _requested(request, parameter)) is not None]
        if values:
            builders.append(functools.partial(sampler.logits_processor, values[0], request))
    return builders


def check_request(engine: Any, task: Any, samplers: dict[str, Sampler], request: Any, model_id: str) -> None:
    """Refuse a request that asks for a sampler or task feature its engine cannot do."""

    def refuse(parameter: str) -> UnsupportedParameterError:
        return UnsupportedParameterError(
            f"model {model_id!r} (engine {engine.name!r}) does not support the parameter {parameter!r}",
            param=parameter,
        )

    for sampler in samplers.values():
        if sampler.name in engine.capabilities:
            continue
        for parameter in sampler.parameters:
            if _requested(request, parameter) is None:
                continue
            if sampler.logits_processor is not None and engine.logits_processors:
                continue
            raise refuse(parameter)
    for feature in task.features:
        if feature.name not in engine.capabilities and feature.requested(request):
            raise refuse(feature.param)
