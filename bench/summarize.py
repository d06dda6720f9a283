"""Markdown table of bench.py results, one row per server, each cell the range over runs.

Example:
  python bench/summarize.py /tmp/lllms-bench/*/*-run*.json
  python bench/summarize.py --quiet-only 0.3 /tmp/lllms-bench/*/*-run*.json
"""

import argparse
import json
from collections import defaultdict


def span(values, digits=1):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    low, high = min(values), max(values)
    if round(low, digits) == round(high, digits):
        return f"{low:.{digits}f}"
    return f"{low:.{digits}f}–{high:.{digits}f}"


def counts(values):
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def get(report, *keys):
    for key in keys:
        if report is None:
            return None
        report = report.get(key)
    return report


def concurrent_cell(runs, n):
    results = [get(r, "concurrent", str(n)) for r in runs]
    results = [x for x in results if x]
    if not results:
        return "–"
    return (
        f"{span([x['aggregate_tokens_per_s'] for x in results])} "
        f"({counts([x['empty'] for x in results])} empty, {counts([x['errors'] for x in results])} errors)"
    )


def turns_cell(runs):
    per_run = [get(r, "growing_chat", "ttft_s") for r in runs]
    per_run = [x for x in per_run if x]
    if not per_run:
        return "–"
    return " / ".join(span([run[t] for run in per_run], 2) for t in range(len(per_run[0])))


def conversations_cell(runs):
    results = [r.get("conversations") for r in runs if r.get("conversations")]
    if not results:
        return "–"
    return (
        f"{span([x['mean_follow_up_ttft_s'] for x in results], 2)} "
        f"(over {counts([x['follow_ups_with_token'] for x in results])} of {results[0]['follow_ups']} turns; "
        f"{counts([x['empty'] for x in results])} empty, {counts([x['errors'] for x in results])} errors)"
    )


def others_cell(runs):
    """Cores other processes used during the figures, as a range over all figures and runs."""
    values = []
    for r in runs:
        figures = [r.get("single"), r.get("growing_chat"), r.get("conversations")]
        figures += list((r.get("concurrent") or {}).values())
        values += [f.get("other_processes_cores") for f in figures if f]
    return span(values, 2)


def drop_noisy_figures(report, max_cores):
    """Removes the figures taken while other processes used more than max_cores."""

    def noisy(figure):
        return figure.get("other_processes_cores") is None or figure["other_processes_cores"] > max_cores

    for name in ("single", "growing_chat", "conversations"):
        if report.get(name) and noisy(report[name]):
            del report[name]
    concurrent = report.get("concurrent") or {}
    for n in [n for n, figure in concurrent.items() if noisy(figure)]:
        del concurrent[n]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="JSON files printed by bench.py")
    p.add_argument("--quiet-only", type=float, metavar="CORES",
                   help="leave out figures taken while other processes used more than CORES cores")
    args = p.parse_args()
    by_label = defaultdict(list)
    for path in args.results:
        with open(path) as f:
            report = json.load(f)
        if args.quiet_only is not None:
            drop_noisy_figures(report, args.quiet_only)
        by_label[report["label"]].append(report)
    print(
        "| server | runs | 1 stream tok/s | 8 streams aggregate tok/s | 16 streams aggregate tok/s "
        "| TTFT s, turns 1 / 2 / 3 / 4 / 5 / 6 | mean follow-up TTFT s, 8 conversations | peak RSS MiB "
        "| cores used by other processes |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, runs in by_label.items():
        print(
            f"| {label} | {len(runs)} "
            f"| {span([get(r, 'single', 'tokens_per_s') for r in runs])} "
            f"| {concurrent_cell(runs, 8)} | {concurrent_cell(runs, 16)} "
            f"| {turns_cell(runs)} | {conversations_cell(runs)} "
            f"| {span([get(r, 'memory', 'peak_rss_mib') for r in runs], 0)} | {others_cell(runs)} |"
        )


if __name__ == "__main__":
    main()
