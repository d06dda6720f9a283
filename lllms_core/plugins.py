"""The plugin manager: built-in tasks and samplers plus the ``lllms`` entry points.

Environment:
- ``LLLMS_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins.
- ``LLLMS_PLUGINS=a,b``: load only the entry points with these names.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from functools import cached_property

import pluggy

from lllms_core import composed, hookspecs, samplers, tasks

log = logging.getLogger("lllms.plugins")

ENTRY_POINT_GROUP = "lllms"


class PluginManager(pluggy.PluginManager):
    """A pluggy manager with the registries the hooks fill, built on first use."""

    def __init__(self) -> None:
        super().__init__("lllms")
        self.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}
        """Entry points that failed to load, with the error."""
        self.distributions: dict[str, str] = {}
        """Loaded entry-point plugins, with their distribution and version."""

    def _collect(self, hook) -> dict:
        found: dict = {}

        def register(item) -> None:
            if item.name in found and found[item.name] is not item:
                log.warning("%s %r registered twice; keeping the first", type(item).__name__, item.name)
                return
            found[item.name] = item

        hook(register=register)
        return found

    @cached_property
    def engines(self) -> dict:
        """Engine classes by name."""
        return self._collect(self.hook.register_engines)

    @cached_property
    def tasks(self) -> dict:
        """Tasks by name."""
        return self._collect(self.hook.register_tasks)

    @cached_property
    def samplers(self) -> dict:
        """Samplers by name."""
        return self._collect(self.hook.register_samplers)

    @cached_property
    def completion_parameters(self) -> frozenset[str]:
        """Parameters a model's ``completion_defaults`` may set."""
        plugin_parameters = {p for sampler in self.samplers.values() for p in sampler.parameters}
        return samplers.COMPLETION_PARAMETERS | plugin_parameters

    def register(self, plugin, name=None):
        # a registration after first use must show in the registries
        for registry in ("engines", "tasks", "samplers", "completion_parameters"):
            self.__dict__.pop(registry, None)
        return super().register(plugin, name)

    def load_entry_points(self) -> None:
        if os.environ.get("LLLMS_DISABLE_PLUGIN_AUTOLOAD", "").lower() in ("1", "true", "yes"):
            return
        only = {name.strip() for name in os.environ.get("LLLMS_PLUGINS", "").split(",") if name.strip()}
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if only and entry_point.name not in only:
                continue
            if self.get_plugin(entry_point.name) is not None or self.is_blocked(entry_point.name):
                continue
            try:
                plugin = entry_point.load()
            except Exception as error:  # a broken plugin must not stop the server
                self.failed[entry_point.name] = f"{type(error).__name__}: {error}"
                log.warning("plugin %r failed to load and is skipped: %s", entry_point.name, error)
                continue
            self.register(plugin, name=entry_point.name)
            if entry_point.dist is not None:
                self.distributions[entry_point.name] = f"{entry_point.dist.name} {entry_point.dist.version}"


def get_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """Build a plugin manager with the built-in tasks, samplers and the ``composed`` engine, and (by default) the
    plugins installed under the ``lllms`` entry-point group."""
    manager = PluginManager()
    manager.register(tasks, name="lllms.tasks")
    manager.register(samplers, name="lllms.samplers")
    manager.register(composed, name="lllms.composed")
    if load_entry_points:
        manager.load_entry_points()
    return manager
