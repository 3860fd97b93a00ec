"""Plots of benchmark reports (matplotlib, Agg backend, PNG files).

- `throughput_bars(report, path)`: output tokens/s per system, one group of bars per workload.
- `serving_curves(report, path)`: TTFT p50/p99, TPOT and throughput against request rate.

Both take the JSON dicts the benchmarks write, so a saved report can be re-plotted with
`python -m benchmarks.plots benchmarks/out/throughput.json` (or serving.json).
"""
from __future__ import annotations

import json
import math
import sys


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x)


def throughput_bars(report: dict, path: str) -> None:
    """Grouped bar chart; skipped or failed systems are left out of the bars."""
    plt = _plt()
    wls = list(report["workloads"])
    systems: list[str] = []
    for w in wls:
        for s in report["workloads"][w]["systems"]:
            if not s.get("skipped") and s["system"] not in systems:
                systems.append(s["system"])
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(systems) * len(wls)), 4.2))
    width = 0.8 / max(1, len(systems))
    for j, sys_name in enumerate(systems):
        vals = []
        for w in wls:
            row = next((s for s in report["workloads"][w]["systems"] if s["system"] == sys_name), None)
            vals.append(row["output_tok_s"] if row and not row.get("skipped") and _ok(row["output_tok_s"]) else 0.0)
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(wls))]
        bars = ax.bar(xs, vals, width, label=sys_name)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in vals], fontsize=7)
    ax.set_xticks(range(len(wls)), wls, fontsize=8)
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Offline throughput, {report.get('dtype', '')}, {report.get('threads', '')} threads")
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def serving_curves(report: dict, path: str) -> None:
    """Latency and throughput against offered request rate, one line per series."""
    plt = _plt()
    rows = [r for r in report["rates"] if not r.get("skipped")]
    rates = [r["request_rate"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series = [(axes[0], "TTFT (s)", [("ttft_p50", "p50"), ("ttft_p90", "p90"), ("ttft_p99", "p99")]),
              (axes[1], "per-token latency (s)", [("tpot_mean", "TPOT mean"), ("itl_mean", "ITL mean"),
                                                  ("itl_p99", "ITL p99")]),
              (axes[2], "per second", [("output_tok_s", "output tok/s"), ("goodput_req_s_x10", "goodput req/s x10")])]
    for r in rows:
        r["goodput_req_s_x10"] = 10 * r.get("goodput_req_s", math.nan)
    for ax, ylabel, keys in series:
        for key, label in keys:
            ax.plot(rates, [r.get(key, math.nan) for r in rows], marker="o", label=label)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Serving: {report.get('server', '')}, {report.get('arrival', '')} arrivals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.plots REPORT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        report = json.load(f)
    out = argv[0].rsplit(".", 1)[0] + ".png"
    (serving_curves if "rates" in report else throughput_bars)(report, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
