"""What this machine gives the server: the CPU cores this process may use, its memory, and
the defaults that follow from them.

Engines ask here instead of guessing from ``os.cpu_count()``: a process may be pinned to
some CPUs (``taskset``, ``cpuset``), limited by a cgroup CPU quota (a container's
``--cpus``), or run on a machine with two hardware threads per core, where one compute
thread per *physical* core is fastest (ggml's and torch's threads spin; two on one core,
or more than the quota allows, slow every step down). A setting the user made always wins
over what is chosen here.

Each choice carries its reason, so ``lllms serve`` can log what it chose and why, and the
status report can show it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("lllms.machine")

MIB = 1024 * 1024

MIN_SEQUENCES = 4
"""Never fewer sequences than llama-server chooses by itself (``-np`` auto: 4, one unified KV cache)."""
SEQUENCES_PER_CORE = 4
"""Batched decoding on a CPU gains up to several sequences per core (measured: SmolLM2 on 2
cores, 8 sequences decode about 1.7 times the tokens of 1 and 1.2 times those of 4)."""
MAX_SEQUENCES = 64
MIN_CONTEXT_PER_SEQUENCE = 2048
DEFAULT_CONTEXT_PER_SEQUENCE = 4096
KV_SHARE = 0.5
"""At most this share of the memory left after the weights goes to one instance's KV cache."""
BUDGET_SHARE = 0.8
"""The server's default memory budget: this share of the memory it may use."""


@dataclass(frozen=True)
class CpuFacts:
    """The CPUs this process may run on."""

    allowed: int
    """Logical CPUs in the process's affinity mask."""
    physical: int
    """Physical cores those CPUs belong to."""
    quota: float | None
    """The cgroup CPU quota, in cores (None: no quota)."""
    quota_source: str | None = None

    @property
    def threads(self) -> int:
        """Compute threads to run: one per physical core, no more than the quota allows."""
        threads = self.physical
        if self.quota is not None:
            threads = min(threads, max(1, math.floor(self.quota)))
        return max(1, threads)

    def reason(self) -> str:
        text = f"{self.physical} physical cores among the {self.allowed} CPUs this process may use"
        if self.quota is not None:
            text += f", cgroup CPU quota {self.quota:g} cores ({self.quota_source})"
        return text


@dataclass(frozen=True)
class MemoryFacts:
    """The memory this process may use."""

    total: int
    """Bytes of RAM of the machine (MemTotal)."""
    limit: int | None
    """A cgroup memory limit in bytes, if one is set below the machine's RAM."""
    limit_source: str | None = None

    @property
    def usable(self) -> int:
        return min(self.total, self.limit) if self.limit else self.total

    def reason(self) -> str:
        text = f"{self.total // MIB} MiB of RAM"
        if self.limit:
            text += f", cgroup memory limit {self.limit // MIB} MiB ({self.limit_source})"
        return text


@dataclass(frozen=True)
class Machine:
    cpu: CpuFacts
    memory: MemoryFacts
    root: Path = field(default=Path("/"), compare=False)

    def memory_budget(self) -> int:
        """The default memory budget of the server, in bytes."""
        return int(self.memory.usable * BUDGET_SHARE)


# --- detection ------------------------------------------------------------------------


def detect(root: Path | str = "/", affinity: set[int] | None = None) -> Machine:
    """The facts of the machine as this process sees it. ``root`` is where ``/proc`` and
    ``/sys`` are read from (tests point it at a fixture tree); ``affinity`` defaults to the
    process's own CPU affinity."""
    root = Path(root)
    if affinity is None:
        affinity = _affinity()
    groups = _cgroups(root)
    return Machine(cpu=_cpu_facts(root, affinity, groups), memory=_memory_facts(root, groups), root=root)


@lru_cache(maxsize=1)
def this_machine() -> Machine:
    """The facts of this process's machine, read once."""
    return detect()


def default_memory_budget() -> int:
    """The server's memory budget when none is configured, in bytes."""
    return this_machine().memory_budget()


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cpu_facts(root: Path, affinity: set[int], groups: list["_Cgroup"]) -> CpuFacts:
    cores: set[str] = set()
    for cpu in affinity:
        topology = root / "sys/devices/system/cpu" / f"cpu{cpu}" / "topology"
        siblings = _read(topology / "core_cpus_list") or _read(topology / "thread_siblings_list")
        cores.add(siblings if siblings is not None else f"cpu{cpu}")
    quota, source = _cpu_quota(groups)
    return CpuFacts(allowed=len(affinity), physical=max(1, len(cores)), quota=quota, quota_source=source)


class _Cgroup:
    """One cgroup hierarchy this process belongs to: where its directory is mounted."""

    def __init__(self, version: int, controllers: set[str], mount: Path, directory: Path):
        self.version = version
        self.controllers = controllers
        self.mount = mount
        self.directory = directory

    def ancestry(self):
        """This group's directory, then each parent's up to the mount point: a parent's
        limit binds its children too."""
        directory = self.directory
        while True:
            yield directory
            if directory == self.mount or self.mount not in directory.parents:
                return
            directory = directory.parent


def _cgroups(root: Path) -> list[_Cgroup]:
    """The cgroup directories of this process, from /proc/self/cgroup and /proc/self/mountinfo."""
    membership = _read(root / "proc/self/cgroup")
    mountinfo = _read(root / "proc/self/mountinfo")
    if not membership or not mountinfo:
        return []
    mounts: list[tuple[int, set[str], str, str]] = []  # version, controllers, mounted root, mount point
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            mounts.append((2, set(), fields[3], fields[4]))
        elif tail[0] == "cgroup":
            mounts.append((1, set(tail[2].split(",")), fields[3], fields[4]))
    groups = []
    for line in membership.splitlines():
        number, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        version = 2 if number == "0" and not names else 1
        controllers = set(names.split(",")) if names else set()
        for mount_version, options, mounted_root, point in mounts:
            if mount_version != version or (version == 1 and not controllers & options):
                continue
            relative = _relative(path, mounted_root)
            if relative is None:
                continue
            mount = root / point.lstrip("/")
            groups.append(_Cgroup(version, controllers, mount, mount / relative if relative else mount))
            break
    return groups


def _relative(path: str, mounted_root: str) -> str | None:
    """``path`` (a group, as /proc/self/cgroup names it) relative to the mounted root, or
    None when that mount does not show it."""
    if mounted_root == "/":
        return path.strip("/")
    if path == mounted_root:
        return ""
    if path.startswith(mounted_root.rstrip("/") + "/"):
        return path[len(mounted_root) :].strip("/")
    return None


def _cpu_quota(groups: list[_Cgroup]) -> tuple[float | None, str | None]:
    best: tuple[float | None, str | None] = (None, None)
    for group in groups:
        if group.version == 1 and "cpu" not in group.controllers:
            continue
        for directory in group.ancestry():
            if group.version == 2:
                text = _read(directory / "cpu.max")
                parts = text.split() if text else []
                if len(parts) != 2 or parts[0] == "max":
                    continue
                quota, period, source = parts[0], parts[1], directory / "cpu.max"
            else:
                quota = _read(directory / "cpu.cfs_quota_us")
                period = _read(directory / "cpu.cfs_period_us")
                source = directory / "cpu.cfs_quota_us"
                if quota is None or period is None or quota.startswith("-"):
                    continue
            try:
                cores = int(quota) / int(period)
            except (ValueError, ZeroDivisionError):
                continue
            if best[0] is None or cores < best[0]:
                best = (cores, str(source))
    return best


def _memory_facts(root: Path, groups: list[_Cgroup]) -> MemoryFacts:
    total = 0
    for line in (_read(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 8 * 1024 * MIB
    limit: int | None = None
    source: str | None = None
    for group in groups:
        if group.version == 1 and "memory" not in group.controllers:
            continue
        name = "memory.max" if group.version == 2 else "memory.limit_in_bytes"
        for directory in group.ancestry():
            text = _read(directory / name)
            if not text or not text.isdigit():
                continue
            value = int(text)
            if value < total and (limit is None or value < limit):
                limit, source = value, str(directory / name)
    return MemoryFacts(total=total, limit=limit, limit_source=source)


# --- defaults ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """A default chosen for the machine, with the reason."""

    value: int
    reason: str
    user: bool = False
    """True when the value is the user's setting."""


def cpu_threads(setting: int | None, machine: Machine | None = None) -> Choice:
    """Compute threads for one instance: the user's ``device.cpu_threads``, else one per
    physical core this process may use."""
    if setting is not None:
        return Choice(setting, "device.cpu_threads", user=True)
    machine = machine or this_machine()
    return Choice(machine.cpu.threads, machine.cpu.reason())


def choose_sequences(
    *,
    parallel: int | None,
    context_size: int | None,
    trained_context: int | None,
    kv_bytes_per_token: int,
    weights_bytes: int,
    threads: int,
    memory: int,
) -> tuple[Choice, Choice]:
    """How many sequences one instance decodes together, and the context of each.

    ``parallel``/``context_size``: the user's settings (None: choose). ``memory``: the bytes
    the instance may take (the server's memory budget). Sequences: ``SEQUENCES_PER_CORE``
    per compute thread, at least ``MIN_SEQUENCES`` (llama-server's automatic choice) and
    at most ``MAX_SEQUENCES``. Context per sequence: the model's training context, at most
    ``DEFAULT_CONTEXT_PER_SEQUENCE``. When the KV cache of all sequences would take more
    than ``KV_SHARE`` of the memory left after the weights, the context shrinks first (not
    below ``MIN_CONTEXT_PER_SEQUENCE``), then the sequences (not below ``MIN_SEQUENCES``).
    """
    trained = trained_context or DEFAULT_CONTEXT_PER_SEQUENCE
    room = max(0, memory - weights_bytes) * KV_SHARE
    if context_size is not None:
        context = Choice(context_size, "context_size", user=True)
    else:
        value = min(trained, DEFAULT_CONTEXT_PER_SEQUENCE)
        context = Choice(value, f"the model's training context {trained}, at most {DEFAULT_CONTEXT_PER_SEQUENCE}")
    if parallel is not None:
        count = Choice(parallel, "parallel", user=True)
    else:
        value = max(MIN_SEQUENCES, min(MAX_SEQUENCES, SEQUENCES_PER_CORE * threads))
        count = Choice(value, f"{SEQUENCES_PER_CORE} per compute thread ({threads}), at least {MIN_SEQUENCES} as llama-server")

    def kv(n: int, tokens: int) -> int:
        return n * tokens * kv_bytes_per_token

    if kv(count.value, context.value) <= room or not kv_bytes_per_token:
        return count, context
    budget_note = f"KV cache within {KV_SHARE:.0%} of the {int(room / KV_SHARE) // MIB} MiB left for it beside the weights"
    if not context.user:
        fitting = int(room // (count.value * kv_bytes_per_token)) // 256 * 256
        floor = min(MIN_CONTEXT_PER_SEQUENCE, context.value)
        value = max(floor, min(context.value, fitting))
        if value < context.value:
            context = Choice(value, f"{context.reason}; shrunk to keep the {budget_note}")
    if kv(count.value, context.value) > room and not count.user:
        fitting = int(room // (context.value * kv_bytes_per_token))
        value = max(MIN_SEQUENCES, min(count.value, fitting))
        if value < count.value:
            count = Choice(value, f"{count.reason}; fewer to keep the {budget_note}")
    return count, context


def log_choices(subject: str, choices: dict[str, Choice]) -> None:
    """Log the defaults chosen for ``subject`` (a model id) at info level, one structured line."""
    chosen = {name: choice for name, choice in choices.items() if not choice.user}
    if not chosen:
        return
    log.info(
        "defaults for model %r: %s",
        subject,
        ", ".join(f"{name}={choice.value}" for name, choice in chosen.items()),
        extra={"model": subject, **{f"{name}_reason": choice.reason for name, choice in chosen.items()}},
    )


def describe_choices(choices: dict[str, Choice]) -> dict[str, dict]:
    """The choices as the status report shows them."""
    return {
        name: {"value": choice.value, "source": "setting" if choice.user else "machine", "reason": choice.reason}
        for name, choice in choices.items()
    }


def process_rss() -> int:
    """Bytes of memory this process holds now (its resident set)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc), so that the resident memory
    falls after a model is unloaded; elsewhere nothing to do (blocking, briefly)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
