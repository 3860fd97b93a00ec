"""Draws the panels of deploy/grafana/conveyor-dashboard.json with matplotlib from Prometheus
scrapes of a server under a small load: the offline stand-in for a Grafana screenshot (no
Grafana or Prometheus server is needed or used; the panels' own PromQL is evaluated by
benchmarks/promql_lite.py over the scrape series).

    python -m benchmarks.dashboard_png                      # starts `conveyor serve` with a demo config
    python -m benchmarks.dashboard_png --url http://127.0.0.1:8000 --admin-key sk-...   # a running server

It scrapes /metrics and /admin/metrics once a second while a few client threads send a mix of
requests (streams and JSON, two tenants, prompts with an e-mail address for the PII guard, a
tenant past its requests-per-minute limit, a few clients that leave mid-stream and a few bad
requests, and every 30 s a burst past the limit), then writes docs/img/dashboard.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.promql_lite import Scrapes, evaluate

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "conveyor-dashboard.json"
KEYS = {"acme": "sk-acme-demo", "free": "sk-free-demo", "ops": "sk-ops-demo"}
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Explain recursion briefly.",
           "List three colors.", "Say hello to bob@example.com politely.", "Count from one to ten."]


def demo_config() -> str:
    from server.auth import hash_key

    return f"""
[guards.pii]
type = "pii"
redact_input = true

[[models]]
name = "SmolLM2-135M-Instruct"
price = {{ prompt_per_1k = 0.0001, cached_per_1k = 0.00005, completion_per_1k = 0.0002 }}

[[tenants]]
name = "acme"
api_key_sha256 = ["{hash_key(KEYS['acme'])}"]
guards = ["pii"]
[[tenants]]
name = "free"
api_key_sha256 = ["{hash_key(KEYS['free'])}"]
requests_per_minute = 3
[[tenants]]
name = "ops"
api_key_sha256 = ["{hash_key(KEYS['ops'])}"]
admin = true
"""


def start_server(port: int, extra: list[str]) -> subprocess.Popen:
    folder = Path(tempfile.mkdtemp(prefix="conveyor-dashboard-"))
    (folder / "conveyor.toml").write_text(demo_config())
    cmd = [sys.executable, "-m", "conveyor", "serve", "--config", str(folder / "conveyor.toml"),
           "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"conveyor serve exited with {proc.returncode}")
        time.sleep(1)
    proc.terminate()
    raise SystemExit("the server did not become ready")


def client(url: str, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.is_set():
            tenant = "free" if rng.random() < 0.35 else "acme"
            prompt = PROMPTS[4] if rng.random() < 0.25 else rng.choice(PROMPTS)  # [4]: the PII guard acts
            body = {"messages": [{"role": "user", "content": prompt}],
                    "max_tokens": rng.choice([8, 16, 32]), "temperature": 0.7}
            headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
            roll = rng.random()
            if roll < 0.05:
                body["temperature"] = -1  # a bad request: 400
            if roll < 0.55:
                http.post("/v1/chat/completions", json=body, headers=headers)
                continue
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as r:
                for i, _ in enumerate(r.iter_lines()):
                    if roll > 0.93 and i == 3:
                        break  # the client leaves mid-stream: an abort


def burst(url: str, stop: threading.Event) -> None:
    """Every 30 s the `free` tenant fires 5 one-token requests at once (a batch job): past its
    3 requests per minute they are refused with 429."""
    def one(http: httpx.Client) -> None:
        http.post("/v1/completions", json={"prompt": "ping", "max_tokens": 1},
                  headers={"Authorization": f"Bearer {KEYS['free']}"})

    with httpx.Client(base_url=url, timeout=120) as http:
        while not stop.wait(20.0):
            jobs = [threading.Thread(target=one, args=(http,)) for _ in range(5)]
            for j in jobs:
                j.start()
            for j in jobs:
                j.join()
            stop.wait(10.0)


def scrape(url: str, admin_key: str | None, scrapes: Scrapes, stop: threading.Event, t0: float) -> None:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    with httpx.Client(base_url=url, timeout=10) as http:
        while not stop.is_set():
            started = time.monotonic()
            text = http.get("/metrics").text
            if admin_key:
                text += http.get("/admin/metrics", headers=headers).text
            scrapes.add(started - t0, text)
            stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))


def render(scrapes: Scrapes, out: Path, rate_window: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] == "timeseries"]
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(16, 2.6 * rows), squeeze=False)
    variables = {"model_name": ".*", "__rate_interval": rate_window}
    for ax, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            series: dict = {}
            for i, t in enumerate(scrapes.times):
                value = evaluate(target["expr"], scrapes, i, variables)
                for labels, v in ({frozenset(): value} if isinstance(value, float) else value).items():
                    name = target["legendFormat"]
                    for k, lv in labels:
                        name = name.replace("{{" + k + "}}", lv)
                    series.setdefault(name, ([], []))
                    series[name][0].append(t)
                    series[name][1].append(v)
            for name, (xs, ys) in sorted(series.items()):
                ax.plot(xs, ys, label=name, linewidth=1.2)
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.set_xlabel("seconds", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        ax.set_ylabel(unit, fontsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left", ncol=2)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one with a demo config)")
    p.add_argument("--admin-key", default=None, help="admin key for /admin/metrics (demo server: its own)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--duration", type=float, default=90.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rate-window", default="15s", help="what $__rate_interval stands for")
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "dashboard.png"))
    p.add_argument("--serve-arg", action="append", default=[], help="extra `conveyor serve` argument (repeatable)")
    args = p.parse_args(argv)
    proc = None
    url, admin_key = args.url, args.admin_key
    if url is None:
        proc = start_server(args.port, args.serve_arg)
        url, admin_key = f"http://127.0.0.1:{args.port}", KEYS["ops"]
    scrapes, stop, t0 = Scrapes([], []), threading.Event(), time.monotonic()
    try:
        threads = [threading.Thread(target=scrape, args=(url, admin_key, scrapes, stop, t0), daemon=True)]
        threads += [threading.Thread(target=client, args=(url, stop, i), daemon=True) for i in range(args.clients)]
        threads.append(threading.Thread(target=burst, args=(url, stop), daemon=True))
        for t in threads:
            t.start()
        time.sleep(args.duration)
        stop.set()
        for t in threads:
            t.join(120)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    title = (f"Conveyor dashboard panels over {len(scrapes.times)} scrapes, {args.clients} clients "
             f"(matplotlib rendering of deploy/grafana/conveyor-dashboard.json, {time.strftime('%Y-%m-%d')})")
    render(scrapes, Path(args.out), args.rate_window, title)
    print(f"{len(scrapes.times)} scrapes -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
