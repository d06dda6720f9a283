"""Hook specifications of lllms plugins.

Hooks are small, synchronous registration functions, called with keyword
arguments only. A plugin implements any of them with ``@lllms_core.hookimpl``
and is found through the ``lllms`` entry-point group.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("lllms")
hookimpl = pluggy.HookimplMarker("lllms")


@hookspec
def register_engines(register):
    """Register engines.

    :param register: call ``register(engine_class)`` once per engine, with a subclass of
        :class:`lllms_core.engine.Engine`. Its ``name`` is what models write as ``engine``.
        Import the engine's heavy library inside its methods, not at module level.
    :returns: nothing.
    """


@hookspec
def register_tasks(register):
    """Register task types.

    :param register: call ``register(task)`` with a :class:`lllms_core.tasks.Task`: its name
        (``chat-completion``...), its request Struct, the engine method that runs it and the
        optional features a request may ask for.
    :returns: nothing.
    """


@hookspec
def register_samplers(register):
    """Register samplers.

    :param register: call ``register(sampler)`` with a :class:`lllms_core.samplers.Sampler`:
        its name, the request parameters that ask for it and, for a sampler any engine
        exposing logits can apply, a ``logits_processor`` factory.
    :returns: nothing.
    """
