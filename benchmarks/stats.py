"""Result records and their aggregation, shared by the throughput and serving benchmarks.

A system's run produces one `RequestRecord` per request (times in seconds, relative to the
request's own send/arrival) and a `RunResult` (wall time, peak memory). `summarize_run` turns a
`RunResult` into the numbers the reports print; `ratio_table` compares systems.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass
class RequestRecord:
    """What one request cost. `itls` are the gaps between successive output chunks (seconds),
    empty where the system does not stream."""

    prompt_len: int
    output_len: int
    ttft: float | None
    e2e: float
    itls: list[float] = field(default_factory=list)
    error: str | None = None


@dataclass
class RunResult:
    """One system on one workload. `skipped` holds the reason when the system could not run."""

    system: str
    workload: str
    wall_s: float = 0.0
    records: list[RequestRecord] = field(default_factory=list)
    peak_mem_bytes: int | None = None
    skipped: str | None = None
    notes: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunResult":
        recs = [RequestRecord(**r) for r in d.get("records", [])]
        return cls(d["system"], d["workload"], d.get("wall_s", 0.0), recs, d.get("peak_mem_bytes"),
                   d.get("skipped"), d.get("notes", {}))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for an empty list."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize_run(run: RunResult) -> dict:
    """Throughput and latency figures of one run. Output tokens count only successful requests;
    TPOT is (e2e - ttft) / (output_len - 1) per request."""
    ok = [r for r in run.records if r.error is None]
    out_tok = sum(r.output_len for r in ok)
    in_tok = sum(r.prompt_len for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    tpots = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.ttft is not None and r.output_len > 1]
    itls = [x for r in ok for x in r.itls]
    wall = run.wall_s
    return {
        "system": run.system,
        "workload": run.workload,
        "skipped": run.skipped,
        "requests": len(run.records),
        "errors": len(run.records) - len(ok),
        "wall_s": wall,
        "output_tokens": out_tok,
        "output_tok_s": out_tok / wall if wall > 0 else math.nan,
        "total_tok_s": (out_tok + in_tok) / wall if wall > 0 else math.nan,
        "req_s": len(ok) / wall if wall > 0 else math.nan,
        "ttft_mean": mean(ttfts),
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p90": percentile(ttfts, 90),
        "ttft_p99": percentile(ttfts, 99),
        "tpot_mean": mean(tpots),
        "itl_mean": mean(itls),
        "itl_p99": percentile(itls, 99),
        "e2e_mean": mean([r.e2e for r in ok]),
        "e2e_p99": percentile([r.e2e for r in ok], 99),
        "peak_mem_mb": run.peak_mem_bytes / 2**20 if run.peak_mem_bytes else math.nan,
        # CPU seconds the system's processes spent over the timed part (notes["cpu_s"], where the
        # peer records it): on a shared machine, work per CPU-second is steadier than per wall-second
        "cpu_s": run.notes.get("cpu_s", math.nan),
        "out_tok_per_cpu_s": out_tok / run.notes["cpu_s"] if run.notes.get("cpu_s") else math.nan,
    }


def goodput(records: list[RequestRecord], wall_s: float, ttft_slo: float, tpot_slo: float) -> float:
    """Requests per second that finished without error within both SLOs (TTFT and TPOT)."""
    if wall_s <= 0:
        return math.nan
    good = 0
    for r in records:
        if r.error is not None or r.ttft is None or r.ttft > ttft_slo:
            continue
        tpot = (r.e2e - r.ttft) / (r.output_len - 1) if r.output_len > 1 else 0.0
        good += tpot <= tpot_slo
    return good / wall_s


def median_summary(summaries: list[dict]) -> dict:
    """Per-field median over repeated runs of one system (non-numeric fields from the first)."""
    if not summaries:
        raise ValueError("summaries is empty")
    out = dict(summaries[0])
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [s[k] for s in summaries if isinstance(s.get(k), (int, float)) and not math.isnan(s[k])]
            out[k] = percentile(vals, 50) if vals else math.nan
    out["rounds"] = len(summaries)
    return out


def ratio_table(summaries: list[dict], subject: str, key: str = "output_tok_s") -> dict[str, float]:
    """`subject`'s `key` divided by every other system's (for systems that ran)."""
    by = {s["system"]: s for s in summaries if not s.get("skipped")}
    if subject not in by:
        return {}
    base = by[subject][key]
    return {name: base / s[key] for name, s in by.items() if name != subject and s[key] and s[key] > 0}


def fmt(x, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}"


def markdown_table(summaries: list[dict], columns: list[tuple[str, str, int]]) -> str:
    """A markdown table; `columns` are (header, key, digits). Skipped systems show the reason."""
    head = "| system | " + " | ".join(h for h, _, _ in columns) + " |"
    sep = "| --- | " + " | ".join("---:" for _ in columns) + " |"
    rows = [head, sep]
    for s in summaries:
        if s.get("skipped"):
            rows.append(f"| {s['system']} | skipped: {s['skipped']} |" + " |" * (len(columns) - 1))
        else:
            rows.append(f"| {s['system']} | " + " | ".join(fmt(s.get(k), d) for _, k, d in columns) + " |")
    return "\n".join(rows)
