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
from lllms_core.errors import ConfigError

log = logging.getLogger("lllms.plugins")

ENTRY_POINT_GROUP = "lllms"


class PluginConflictError(ConfigError):
    """Two plugins registered an engine, task or sampler of the same name."""


class PluginManager(pluggy.PluginManager):
    """A pluggy manager with the registries the hooks fill, built on first use."""

    def __init__(self) -> None:
        super().__init__("lllms")
        self.add_hookspecs(hookspecs)
        self.failed: dict[str, str] = {}
        """Entry points that failed to load, with the error."""
        self.distributions: dict[str, str] = {}
        """Loaded entry-point plugins, with their distribution and version."""
        self.owners: dict[str, dict[str, str]] = {}
        """By kind (``engine``, ``task``, ``sampler``): the plugin that registered each name."""

    def _collect(self, hook, kind: str) -> dict:
        """What the plugins register through ``hook``, by name. Two plugins registering one
        name is an error naming both: which of them would serve is not the user's choice."""
        found: dict = {}
        owners = self.owners[kind] = {}
        for implementation in hook.get_hookimpls():
            plugin = implementation.plugin_name

            def register(item, plugin=plugin) -> None:
                owner = owners.setdefault(item.name, plugin)
                if found.setdefault(item.name, item) is not item:
                    raise PluginConflictError(
                        f"{kind} {item.name!r} is registered by two plugins: {self.describe(owner)} and "
                        f"{self.describe(plugin)}; uninstall one, or choose plugins with LLLMS_PLUGINS"
                    )

            arguments = {"register": register}
            implementation.function(*[arguments[name] for name in implementation.argnames])
        return found

    def describe(self, plugin: str) -> str:
        """A plugin's name, with its distribution and version when it came from one (an
        object registered without a name is named by its class)."""
        distribution = self.distributions.get(plugin)
        if distribution:
            return f"{plugin!r} ({distribution})"
        if plugin.isdigit():  # pluggy names such an object by its id()
            return f"a {type(self.get_plugin(plugin)).__qualname__} object"
        return repr(plugin)

    @cached_property
    def engines(self) -> dict:
        """Engine classes by name."""
        return self._collect(self.hook.register_engines, "engine")

    @cached_property
    def tasks(self) -> dict:
        """Tasks by name."""
        return self._collect(self.hook.register_tasks, "task")

    @cached_property
    def samplers(self) -> dict:
        """Samplers by name."""
        return self._collect(self.hook.register_samplers, "sampler")

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
