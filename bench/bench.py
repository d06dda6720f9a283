"""Load benchmark for any OpenAI-compatible chat server.

Prints one JSON document with:
  single        tokens/s of one stream at a time
  concurrent    aggregate tokens/s of 8 and of 16 simultaneous streams, and how
                many of them came back empty or failed
  plain         aggregate tokens/s of as many simultaneous requests without
                streaming (one answer each): the same work as "concurrent"
                without a chunk per token, so the two together show what
                streaming costs a server (not among the default figures)
  growing_chat  time to first token of each turn of one 6-turn conversation
                (every turn resends the whole history plus a new question)
  conversations mean time to first token of the follow-up turns when 8 such
                conversations run at once
  memory        peak resident memory of the server process, if --pid is given

Every prompt starts with a fresh nonce and random words, so a server's prompt
cache cannot carry over from one run to the next; within a conversation the
history is resent as is, so a cache may (and should) help follow-up turns.

Tokens are counted from the server's `usage` (asked for with
stream_options.include_usage); a server that sends none is counted by its
content chunks, and the JSON says which count was used.

Example:
  python bench/bench.py --base-url http://127.0.0.1:8002/v1 --model smollm2 --label llama-server
"""

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import statistics
import sys
import time
import uuid

import openai

WORDS = (
    "river lantern orchard falcon copper meadow glacier harbor violin pepper "
    "canyon thistle ember quartz willow beacon saddle marble comet hollow "
    "tundra velvet anchor prairie cobalt juniper summit lagoon ivory cedar "
    "badger sparrow tunnel basalt clover riddle compass beetle voyage mosaic"
).split()

LONG_ANSWER = "Answer at length, with many details and examples, in at least 400 words."


def fresh_topic(rng):
    return f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randint(100, 99999)}"


def fresh_prompt(rng):
    """A first user message that no earlier run has sent and that asks for a long answer."""
    return (
        f"[request {uuid.uuid4().hex[:12]}] Write a story about a {rng.choice(WORDS)} "
        f"named {fresh_topic(rng)} who travels to the {rng.choice(WORDS)} with a "
        f"{rng.choice(WORDS)} and a {rng.choice(WORDS)}. {LONG_ANSWER}"
    )


def follow_up_question(rng):
    return (
        f"Now tell me more about the {rng.choice(WORDS)} and the number "
        f"{rng.randint(100, 99999)} in that story. {LONG_ANSWER}"
    )


class Bench:
    def __init__(self, args):
        self.args = args
        self.client = openai.AsyncOpenAI(
            base_url=args.base_url,
            api_key=args.api_key,
            timeout=args.request_timeout,
            max_retries=0,
        )
        self.rng = random.Random()
        self.include_usage = True

    async def stream_chat(self, messages, max_tokens):
        """One streamed chat completion; returns what a benchmark needs to know of it."""
        extra = {"stream_options": {"include_usage": True}} if self.include_usage else {}
        start = time.perf_counter()
        first_token_at = None
        chunks = 0
        usage = None
        parts = []
        error = error_type = None
        try:
            stream = await self.client.chat.completions.create(
                model=self.args.model,
                messages=messages,
                max_tokens=max_tokens,
                temperature=self.args.temperature,
                stream=True,
                **extra,
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    content = choice.delta.content if choice.delta else None
                    if content:
                        if first_token_at is None:
                            first_token_at = time.perf_counter()
                        chunks += 1
                        parts.append(content)
        except Exception as exc:  # a server error is a figure, not a crash
            error_type = type(exc).__name__
            error = f"{error_type}: {exc}"[:300]
        end = time.perf_counter()
        tokens = usage.completion_tokens if usage is not None else chunks
        return {
            "tokens": tokens,
            "token_source": "usage" if usage is not None else "chunks",
            "prompt_tokens": usage.prompt_tokens if usage is not None else None,
            "cached_tokens": cached_tokens(usage),
            "ttft_s": None if first_token_at is None else first_token_at - start,
            "start_s": start,
            "wall_s": end - start,
            "text": "".join(parts),
            "empty": not parts,
            "error": error,
            "error_type": error_type,
        }

    async def probe_usage_support(self):
        """Warm the server up and find out whether it accepts stream_options."""
        messages = [{"role": "user", "content": fresh_prompt(self.rng)}]
        result = await self.stream_chat(messages, 8)
        if result["error_type"] in ("BadRequestError", "UnprocessableEntityError"):
            self.include_usage = False
            result = await self.stream_chat(messages, 8)
        if result["error"]:
            raise SystemExit(f"server at {self.args.base_url} fails a warm-up request: {result['error']}")
        return {"stream_options_accepted": self.include_usage, "usage_sent": result["token_source"] == "usage"}

    async def single_stream(self):
        max_tokens = self.args.max_tokens
        results = []
        for _ in range(self.args.single_runs):
            messages = [{"role": "user", "content": fresh_prompt(self.rng)}]
            results.append(await self.stream_chat(messages, max_tokens))
        ok = [r for r in results if not r["error"] and r["tokens"]]
        tokens = sum(r["tokens"] for r in ok)
        wall = sum(r["wall_s"] for r in ok)
        decode = [
            (r["tokens"] - 1) / (r["wall_s"] - r["ttft_s"])
            for r in ok
            if r["tokens"] > 1 and r["ttft_s"] is not None and r["wall_s"] > r["ttft_s"]
        ]
        return {
            "max_tokens": max_tokens,
            "requests": len(results),
            "tokens": tokens,
            "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2) if wall else None,
            "decode_tokens_per_s": round(statistics.mean(decode), 2) if decode else None,
            "per_request_tokens_per_s": [round(r["tokens"] / r["wall_s"], 2) for r in ok],
            "mean_ttft_s": mean_or_none([r["ttft_s"] for r in ok]),
            "empty": sum(r["empty"] and not r["error"] for r in results),
            "errors": sum(bool(r["error"]) for r in results),
            "token_source": token_source(results),
            "first_error": first_error(results),
        }

    async def at_once(self, n, request):
        """``n`` fresh prompts sent at once through ``request``; their results and the aggregate."""
        max_tokens = self.args.max_tokens
        prompts = [[{"role": "user", "content": fresh_prompt(self.rng)}] for _ in range(n)]
        start = time.perf_counter()
        results = await asyncio.gather(*(request(m, max_tokens) for m in prompts))
        wall = time.perf_counter() - start
        tokens = sum(r["tokens"] for r in results if not r["error"])
        return results, {
            "max_tokens": max_tokens,
            "tokens": tokens,
            "wall_s": round(wall, 3),
            "aggregate_tokens_per_s": round(tokens / wall, 2),
            "errors": sum(bool(r["error"]) for r in results),
            "first_error": first_error(results),
        }

    async def concurrent_streams(self, n):
        results, figure = await self.at_once(n, self.stream_chat)
        return {
            "streams": n,
            **figure,
            "mean_ttft_s": mean_or_none([r["ttft_s"] for r in results]),
            "max_ttft_s": max_or_none([r["ttft_s"] for r in results]),
            "empty": sum(r["empty"] and not r["error"] for r in results),
            "token_source": token_source(results),
        }

    async def plain_chat(self, messages, max_tokens):
        """One chat completion without streaming: its completion tokens, or the error."""
        try:
            answer = await self.client.chat.completions.create(
                model=self.args.model, messages=messages, max_tokens=max_tokens, temperature=self.args.temperature
            )
            return {"tokens": answer.usage.completion_tokens if answer.usage else 0, "error": None}
        except Exception as exc:  # a server error is a figure, not a crash
            return {"tokens": 0, "error": f"{type(exc).__name__}: {exc}"[:300]}

    async def concurrent_plain(self, n):
        _, figure = await self.at_once(n, self.plain_chat)
        return {"requests": n, **figure}

    async def conversation(self, turns):
        """One growing chat: each turn resends the history with the last answer and a new question."""
        messages = [{"role": "user", "content": fresh_prompt(self.rng)}]
        results = []
        for turn in range(turns):
            result = await self.stream_chat(messages, self.args.turn_max_tokens)
            results.append(result)
            # An empty or failed answer still becomes a turn, so every
            # conversation keeps the same shape.
            messages.append({"role": "assistant", "content": result["text"] or "..."})
            messages.append({"role": "user", "content": follow_up_question(self.rng)})
            if self.args.think_time and turn + 1 < turns:
                # a person reads the answer before asking on: the next turn arrives
                # independently of what the server is doing
                await asyncio.sleep(self.rng.uniform(0, self.args.think_time))
        return results

    async def growing_chat(self):
        results = await self.conversation(self.args.turns)
        return {
            "turns": self.args.turns,
            "max_tokens_per_turn": self.args.turn_max_tokens,
            "ttft_s": [round_or_none(r["ttft_s"]) for r in results],
            "prompt_tokens": [r["prompt_tokens"] for r in results],
            "tokens": [r["tokens"] for r in results],
            "empty": sum(r["empty"] and not r["error"] for r in results),
            "errors": sum(bool(r["error"]) for r in results),
            "first_error": first_error(results),
        }

    async def concurrent_conversations(self, n):
        start = time.perf_counter()
        conversations = await asyncio.gather(*(self.conversation(self.args.turns) for _ in range(n)))
        wall = time.perf_counter() - start
        flat = [r for conv in conversations for r in conv]
        first_turns = [conv[0]["ttft_s"] for conv in conversations]
        follow_ups = [r["ttft_s"] for conv in conversations for r in conv[1:]]
        per_turn = [
            mean_or_none([conv[t]["ttft_s"] for conv in conversations]) for t in range(self.args.turns)
        ]
        return {
            "conversations": n,
            "turns": self.args.turns,
            "max_tokens_per_turn": self.args.turn_max_tokens,
            "wall_s": round(wall, 3),
            "tokens": sum(r["tokens"] for r in flat if not r["error"]),
            "aggregate_tokens_per_s": round(sum(r["tokens"] for r in flat if not r["error"]) / wall, 2),
            "mean_first_turn_ttft_s": mean_or_none(first_turns),
            "max_first_turn_ttft_s": max_or_none(first_turns),
            # Only turns that produced a token have a TTFT; the count says how
            # many the mean is over (a server that drops streams has fewer).
            "mean_follow_up_ttft_s": mean_or_none(follow_ups),
            "follow_ups_with_token": sum(t is not None for t in follow_ups),
            "follow_ups": len(follow_ups),
            # follow-ups with at least the previous turn's whole prompt cached: they found
            # their history (needs a server that reports cached tokens)
            "follow_ups_reusing_history": sum(
                1 for conv in conversations for previous, r in zip(conv, conv[1:])
                if previous["prompt_tokens"] and r["cached_tokens"] >= previous["prompt_tokens"]
            ),
            "max_follow_up_ttft_s": max_or_none(follow_ups),
            "mean_ttft_s_per_turn": per_turn,
            "empty": sum(r["empty"] and not r["error"] for r in flat),
            "errors": sum(bool(r["error"]) for r in flat),
            "first_error": first_error(flat),
        }


class MemoryWatch:
    """Samples the resident memory of a process and its children from /proc."""

    def __init__(self, pid, interval=0.2):
        self.pid = pid
        self.interval = interval
        self.peak_tree_rss_kb = 0
        self._task = None

    async def __aenter__(self):
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc):
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def _sample(self):
        while True:
            rss = sum(read_status_kb(p, "VmRSS") or 0 for p in process_tree(self.pid))
            self.peak_tree_rss_kb = max(self.peak_tree_rss_kb, rss)
            await asyncio.sleep(self.interval)

    def report(self):
        # VmHWM is the kernel's own high-water mark of the process since it
        # started, so it includes loading the model, which sampling may miss.
        hwm = read_status_kb(self.pid, "VmHWM")
        return {
            "pid": self.pid,
            "peak_rss_mib": None if hwm is None else round(hwm / 1024, 1),
            "peak_sampled_tree_rss_mib": round(self.peak_tree_rss_kb / 1024, 1),
        }


class CpuMeter:
    """How many cores other processes used while a figure ran.

    The machine is shared: a figure taken while something else ran is not
    comparable, so every figure carries the cores used by everything except
    the server under test (given --pid) and this client.
    """

    def __init__(self, server_pid):
        self.server_pid = server_pid
        self.ticks_per_s = os.sysconf("SC_CLK_TCK")

    def snapshot(self):
        own = process_cpu_ticks(os.getpid())
        if self.server_pid:
            own += sum(process_cpu_ticks(p) for p in process_tree(self.server_pid))
        return time.perf_counter(), machine_busy_ticks(), own

    def others_cores(self, before):
        start, busy_before, own_before = before
        end, busy, own = self.snapshot()
        elapsed = end - start
        others = (busy - busy_before) - (own - own_before)
        return round(max(others, 0) / self.ticks_per_s / elapsed, 2) if elapsed > 0 else None


async def wait_until_quiet(cpu, max_wait_s, max_cores, label):
    """Waits (at most max_wait_s) until other processes use under max_cores for 5 s running."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        before = cpu.snapshot()
        await asyncio.sleep(5)
        others = cpu.others_cores(before)
        if others < max_cores or time.perf_counter() >= deadline:
            return
        print(f"[{label}] waiting for a quieter machine: other processes use {others} cores",
              file=sys.stderr, flush=True)


def machine_busy_ticks():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    # user..steal; guest time is already inside user and nice.
    return sum(fields[:8]) - idle - iowait


def process_cpu_ticks(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # utime, stime, cutime, cstime: fields 14-17 of stat, counted after the name.
    return sum(int(x) for x in fields[11:15])


def read_status_kb(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def process_tree(pid):
    pids = [pid]
    for p in pids:
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                pids.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return pids


def cached_tokens(usage):
    details = getattr(usage, "prompt_tokens_details", None) if usage is not None else None
    return getattr(details, "cached_tokens", None) or 0


def round_or_none(x, digits=3):
    return None if x is None else round(x, digits)


def mean_or_none(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.mean(xs), 3) if xs else None


def max_or_none(xs):
    xs = [x for x in xs if x is not None]
    return round(max(xs), 3) if xs else None


def token_source(results):
    return sorted({r["token_source"] for r in results if not r["error"]})


def first_error(results):
    return next((r["error"] for r in results if r["error"]), None)


FIGURES = ("single", "concurrent", "growing_chat", "conversations")


async def main(args):
    bench = Bench(args)
    report = {
        "label": args.label,
        "base_url": args.base_url,
        "model": args.model,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        # On a shared machine other work skews the figures; the load says how much.
        "load_average_at_start": os.getloadavg(),
        "temperature": args.temperature,
    }
    cpu = CpuMeter(args.pid)

    async def measure(name, figure):
        if args.wait_quiet:
            await wait_until_quiet(cpu, args.wait_quiet, args.quiet_cores, args.label)
        before = cpu.snapshot()
        result = await figure
        result["other_processes_cores"] = cpu.others_cores(before)
        progress(args.label, name, result)
        return result

    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(bench.client.close)
        watch = await stack.enter_async_context(MemoryWatch(args.pid)) if args.pid else None
        report["server"] = await bench.probe_usage_support()
        figures = args.figures.split(",")
        if "single" in figures:
            report["single"] = await measure("single", bench.single_stream())
        if "concurrent" in figures:
            report["concurrent"] = {}
            for n in args.concurrency:
                report["concurrent"][str(n)] = await measure(f"concurrent {n}", bench.concurrent_streams(n))
        if "plain" in figures:
            report["plain"] = {}
            for n in args.concurrency:
                report["plain"][str(n)] = await measure(f"plain {n}", bench.concurrent_plain(n))
        if "growing_chat" in figures:
            report["growing_chat"] = await measure("growing chat", bench.growing_chat())
        if "conversations" in figures:
            report["conversations"] = await measure(
                "conversations", bench.concurrent_conversations(args.conversations)
            )
    if watch:
        report["memory"] = watch.report()
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def progress(label, figure, result):
    shown = {k: v for k, v in result.items() if not isinstance(v, (dict, list)) or k == "ttft_s"}
    print(f"[{label}] {figure}: {json.dumps(shown)}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="model name to send in requests")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "none"))
    p.add_argument("--label", default="server", help="name of the server in the report")
    p.add_argument("--pid", type=int, help="server PID whose peak resident memory to report (Linux)")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of the single and concurrent streams")
    p.add_argument("--turn-max-tokens", type=int, default=128, help="max_tokens of each conversation turn")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--single-runs", type=int, default=3, help="sequential requests for the one-stream figure")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 16])
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--think-time", type=float, default=0, metavar="SECONDS",
                   help="pause a random 0 to SECONDS between a conversation's turns (default: none)")
    p.add_argument("--figures", default=",".join(FIGURES),
                   help=f"comma-separated subset of {','.join(FIGURES + ('plain',))} (default: {','.join(FIGURES)})")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                   help="before each figure, wait up to SECONDS for other processes to go quiet")
    p.add_argument("--quiet-cores", type=float, default=0.3,
                   help="'quiet' means other processes use fewer cores than this (default 0.3)")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
