"""Defaults from the machine: compute threads from the CPU affinity, the cores' topology and a
cgroup CPU quota; sequences and context per sequence within the memory budget.

The affinity is real (a child process under ``taskset``); the quota is real too where this
machine lets a test create a cgroup (root, a writable CPU controller), and is also read from
fixture trees laid out as /proc and /sys are (cgroup v1 and v2, a container's namespace, SMT
siblings), which run everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lllms_core import machine
from lllms_core.machine import MIB, choose_sequences, cpu_threads, detect

CHILD = "from lllms_core.machine import detect; print(detect().cpu.threads)"


def threads_of_child(*prefix: str) -> int:
    """The threads a fresh process started with ``prefix`` (taskset, a shell) would choose."""
    output = subprocess.run([*prefix, sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True)
    return int(output.stdout.strip())


def test_threads_follow_the_cpu_affinity():
    if shutil.which("taskset") is None:
        pytest.skip("taskset (util-linux) is not installed")
    first = min(os.sched_getaffinity(0))
    assert threads_of_child("taskset", "-c", str(first)) == 1
    assert threads_of_child() == detect().cpu.physical


def writable_cpu_cgroup() -> tuple[Path, int] | None:
    """A cgroup directory (and its version) under which this process may create a child group
    with a CPU quota, or None."""
    if os.geteuid() != 0:
        return None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if tail[0] == "cgroup" and "cpu" in tail[2].split(",") and os.access(fields[4], os.W_OK):
            return Path(fields[4]), 1
        if tail[0] == "cgroup2" and "cpu" in (Path(fields[4]) / "cgroup.subtree_control").read_text().split():
            return Path(fields[4]), 2
    return None


def test_threads_follow_a_real_cgroup_cpu_quota():
    found = writable_cpu_cgroup()
    if found is None:
        pytest.skip("no cgroup CPU controller this test may write to (the fixture-tree tests below read quotas)")
    if detect().cpu.physical < 2:
        pytest.skip("one core: a quota of one core changes nothing")
    parent, version = found
    group = parent / f"lllms-test-{os.getpid()}"
    group.mkdir()
    try:
        if version == 1:
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text("100000")
        else:
            (group / "cpu.max").write_text("100000 100000")
        # the shell moves itself into the group, then becomes the child
        assert threads_of_child("sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$0" "$@"') == 1
    finally:
        group.rmdir()


# --- fixture trees ----------------------------------------------------------------------


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def topology(cores: int, threads_per_core: int) -> dict[str, str]:
    """sysfs topology of ``cores`` cores with SMT siblings numbered as Linux does (cpu i and i + cores)."""
    files = {}
    for core in range(cores):
        siblings = ",".join(str(core + sibling * cores) for sibling in range(threads_per_core))
        for sibling in range(threads_per_core):
            files[f"sys/devices/system/cpu/cpu{core + sibling * cores}/topology/core_cpus_list"] = siblings
    return files


MEMINFO = {"proc/meminfo": "MemTotal:       16384000 kB\nMemAvailable:   8000000 kB\n"}


def test_one_thread_per_physical_core_of_the_allowed_cpus(tmp_path):
    root = tree(tmp_path, {**topology(cores=8, threads_per_core=2), **MEMINFO})
    assert detect(root, affinity=set(range(16))).cpu.threads == 8
    assert detect(root, affinity={0, 8}).cpu.threads == 1  # two siblings of one core
    assert detect(root, affinity={0, 1, 2}).cpu.threads == 3


def test_a_cgroup_v2_quota_of_the_group_or_a_parent_limits_the_threads(tmp_path):
    root = tree(tmp_path, {
        **topology(cores=8, threads_per_core=1), **MEMINFO,
        "proc/self/cgroup": "0::/app/worker\n",
        "proc/self/mountinfo": "25 20 0:23 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        "sys/fs/cgroup/app/cpu.max": "max 100000\n",
        "sys/fs/cgroup/app/worker/cpu.max": "250000 100000\n",
        "sys/fs/cgroup/app/worker/memory.max": f"{2048 * MIB}\n",
    })  # fmt: skip
    found = detect(root, affinity=set(range(8)))
    assert found.cpu.quota == 2.5 and found.cpu.threads == 2
    assert found.memory.usable == 2048 * MIB
    (root / "sys/fs/cgroup/app/cpu.max").write_text("150000 100000\n")
    assert detect(root, affinity=set(range(8))).cpu.threads == 1


def test_a_cgroup_v1_quota_inside_a_container_namespace(tmp_path):
    # a container sees its own group mounted as the root of the cpu hierarchy
    root = tree(tmp_path, {
        **topology(cores=4, threads_per_core=1), **MEMINFO,
        "proc/self/cgroup": "5:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n",
        "proc/self/mountinfo": (
            "30 25 0:26 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n"
            "31 25 0:27 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
        ),
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
    })  # fmt: skip
    found = detect(root, affinity=set(range(4)))
    assert found.cpu.threads == 2
    assert found.memory.limit is None  # "no limit" is a huge number


def test_a_setting_always_wins():
    assert cpu_threads(3) == machine.Choice(3, "device.cpu_threads", user=True)
    count, context = choose_sequences(parallel=2, context_size=512, trained_context=8192, kv_bytes_per_token=10**6,
                               weights_bytes=0, threads=16, memory=MIB)
    assert (count.value, context.value) == (2, 512) and count.user and context.user


def test_sequences_and_context_follow_cores_and_memory():
    roomy = dict(trained_context=8192, kv_bytes_per_token=23040, weights_bytes=100 * MIB, memory=16384 * MIB)
    count, context = choose_sequences(parallel=None, context_size=None, threads=2, **roomy)
    assert (count.value, context.value) == (8, 4096)
    count, _ = choose_sequences(parallel=None, context_size=None, threads=1, **roomy)
    assert count.value == machine.MIN_SEQUENCES  # never fewer than llama-server's automatic choice
    # little memory: the context shrinks first, then the sequences, down to the floors
    tight = dict(trained_context=8192, kv_bytes_per_token=131072, weights_bytes=4096 * MIB, threads=8)
    count, context = choose_sequences(parallel=None, context_size=None, memory=12288 * MIB, **tight)
    assert (count.value, context.value) == (16, 2048)  # 4 GiB for the KV cache: 16 × 2048 tokens of 128 KiB
    count, context = choose_sequences(parallel=None, context_size=None, memory=4608 * MIB, **tight)
    assert context.value == machine.MIN_CONTEXT_PER_SEQUENCE and count.value == machine.MIN_SEQUENCES
    assert "shrunk" in context.reason and "fewer" in count.reason
