"""One stream at a time, the servers taking turns request by request.

`peers.sh` measures one server, then the next: on a shared machine a burst of load or a
slower minute then falls on one server only, and the one-stream figure (a few seconds of
work) moves by ±15% from run to run. Here every server already runs, and each round sends
one fresh request to each of them, in an order that alternates from round to round, so the
same minutes weigh on all. Same requests as `bench.py --figures single` (a fresh long-answer
prompt, 128 tokens, temperature 0.7, streamed through the `openai` client).

Prints one JSON document: per server the medians of tokens/s (time to first token
included, as in `bench.py`'s "single"), of the decode rate after the first token and of the
time to first token, and each median's ratio to the first server's.

Example (lllms and llama-server already running):
  python bench/interleaved.py --rounds 20 lllms=http://127.0.0.1:3000/v1 llama-server=http://127.0.0.1:8003/v1
"""

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import Bench, fresh_prompt  # noqa: E402


async def main(args) -> None:
    servers = dict(entry.split("=", 1) for entry in args.servers)
    benches = {
        label: Bench(argparse.Namespace(base_url=url, api_key="none", request_timeout=args.request_timeout,
                                        model=args.model, temperature=args.temperature))
        for label, url in servers.items()
    }  # fmt: skip
    results: dict[str, list[dict]] = {label: [] for label in servers}
    for label, bench in benches.items():  # warm-up: load the model, settle the caches
        await bench.stream_chat([{"role": "user", "content": fresh_prompt(bench.rng)}], 8)
    for round_ in range(args.rounds):
        order = list(benches) if round_ % 2 == 0 else list(reversed(benches))
        for label in order:
            bench = benches[label]
            result = await bench.stream_chat([{"role": "user", "content": fresh_prompt(bench.rng)}], args.max_tokens)
            if result["error"]:
                raise SystemExit(f"{label}: {result['error']}")
            results[label].append(result)
        print(f"round {round_ + 1} of {args.rounds}", file=sys.stderr, flush=True)
    figures = {}
    for label, runs in results.items():
        figures[label] = {
            "tokens_per_s": statistics.median(r["tokens"] / r["wall_s"] for r in runs),
            "decode_tokens_per_s": statistics.median((r["tokens"] - 1) / (r["wall_s"] - r["ttft_s"]) for r in runs),
            "ttft_ms": 1000 * statistics.median(r["ttft_s"] for r in runs),
        }
    first = figures[next(iter(figures))]
    report = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rounds": args.rounds, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "load_average": os.getloadavg(),
        "servers": {
            label: {**{name: round(value, 2) for name, value in figure.items()},
                    "ratio_to_first": {name: round(value / first[name], 3) for name, value in figure.items()}}
            for label, figure in figures.items()
        },
    }  # fmt: skip
    for bench in benches.values():
        await bench.client.close()
    print(json.dumps(report, indent=2))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("servers", nargs="+", metavar="LABEL=URL", help="OpenAI-compatible base URLs, the first is the reference")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--request-timeout", type=float, default=600.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
