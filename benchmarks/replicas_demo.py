"""Two `conveyor serve` replicas on one Redis behind nginx (round-robin), on loopback only: the
local stand-in for deploy/ (docs/scaling.md) that needs no cluster.

It starts redis-server, two replicas with one config, and nginx (Debian's package) in the
foreground with its config in a temporary folder, then shows, through nginx:
1. rate limits hold across replicas: a tenant allowed 10 requests per window (an hour here, so
   the phase never straddles two windows) gets exactly 10 answers out of 16, although each replica alone saw only 8;
2. idempotency holds across replicas: a retry with the same `Idempotency-Key` answered by the
   other replica is a replay (same body, `Idempotent-Replayed: true`); a different body with the
   key gets 422; a retry while the first still runs gets 409;
3. usage holds across replicas, and survives one being killed: concurrent JSON and streaming
   requests, each with its own `user`; one replica gets SIGKILL mid-run; afterwards every
   request that completed (a 200 JSON body, or a stream that reached `[DONE]`) has its usage
   record in Redis (`/v1/usage?group_by=user`) with the tokens its response reported.

    python -m benchmarks.replicas_demo                  # default model (SmolLM2-135M)
    python -m benchmarks.replicas_demo --requests 60 --concurrency 6 --json out.json

Exits non-zero if any check fails. Needs redis-server and nginx on PATH (apt-get install
redis-server nginx-light).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from server.auth import hash_key

KEYS = {"limited": "sk-demo-limited", "acme": "sk-demo-acme", "ops": "sk-demo-ops"}
RPM_LIMIT = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(model: str | None) -> str:
    path = f'path = "{model}"\n' if model else ""
    # an hour-long window, so the limit phase never straddles a window boundary
    return f"""
rate_limit_window_seconds = 3600

[[models]]
name = "demo"
{path}price = {{ prompt_per_1k = 0.001, completion_per_1k = 0.002 }}
engine = {{ max_model_len = 2048 }}

[[tenants]]
name = "limited"
api_key_sha256 = ["{hash_key(KEYS['limited'])}"]
requests_per_minute = {RPM_LIMIT}

[[tenants]]
name = "acme"
api_key_sha256 = ["{hash_key(KEYS['acme'])}"]

[[tenants]]
name = "ops"
api_key_sha256 = ["{hash_key(KEYS['ops'])}"]
admin = true
"""


def nginx_conf(tmp: Path, port: int, upstreams: list[int]) -> str:
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in upstreams)
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/nginx-access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream conveyor {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://conveyor;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;          # streams pass through as they are generated
            proxy_read_timeout 300s;
            add_header X-Upstream $upstream_addr always;
        }}
    }}
}}
"""


def wait_ready(url: str, proc: subprocess.Popen, timeout: float, log: Path | None = None) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            tail = "\n".join(log.read_text().splitlines()[-15:]) if log is not None and log.exists() else ""
            raise RuntimeError(f"{url}: process exited with {proc.returncode}\n{tail}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout} s")


@dataclass
class Outcome:
    user: str
    stream: bool
    status: int | str
    completed: bool = False
    upstream: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0


@dataclass
class Report:
    startup_seconds: list[float] = field(default_factory=list)  # launch -> ready, per replica
    rate_limit: dict = field(default_factory=dict)
    idempotency: dict = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)


def replica(r: httpx.Response) -> str:
    """The replica that answered: the last address nginx tried (`a, b` when a failed first)."""
    return r.headers.get("x-upstream", "?").split(",")[-1].strip()


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def one_request(base: str, i: int, max_tokens: int) -> Outcome:
    """Request i (odd: streaming), user `u-i`; completed only with a final body / [DONE]."""
    stream = i % 2 == 1
    out = Outcome(user=f"u-{i}", stream=stream, status="")
    body = {"model": "demo", "prompt": f"Request {i}: the capital of France is", "max_tokens": max_tokens,
            "temperature": 0.7, "seed": i, "user": out.user}
    start = time.monotonic()
    try:
        if not stream:
            r = httpx.post(base + "/v1/completions", json=body, headers=auth("acme"), timeout=120)
            out.status, out.upstream = r.status_code, replica(r)
            if r.status_code == 200:
                usage = r.json()["usage"]
                out.completed = True
                out.prompt_tokens, out.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
        else:
            body.update(stream=True, stream_options={"include_usage": True})
            with httpx.stream("POST", base + "/v1/completions", json=body, headers=auth("acme"), timeout=120) as r:
                out.status, out.upstream = r.status_code, replica(r)
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: "):]
                    if data == "[DONE]":
                        out.completed = r.status_code == 200 and out.prompt_tokens is not None
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                        out.completion_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.status = type(exc).__name__
    out.seconds = time.monotonic() - start
    return out


def rate_limit_phase(base: str, report: Report) -> bool:
    statuses, upstreams = [], {}
    body = {"model": "demo", "prompt": "Hi", "max_tokens": 1}
    for _ in range(16):
        r = httpx.post(base + "/v1/completions", json=body, headers=auth("limited"), timeout=120)
        statuses.append(r.status_code)
        upstreams[replica(r)] = upstreams.get(replica(r), 0) + 1
    report.rate_limit = {"limit_requests_per_window": RPM_LIMIT, "window_seconds": 3600, "sent": 16, "ok": statuses.count(200),
                         "refused_429": statuses.count(429), "requests_per_replica": upstreams}
    return statuses.count(200) == RPM_LIMIT and statuses.count(429) == 6 and len(upstreams) == 2


def idempotency_phase(base: str, report: Report) -> bool:
    key = f"demo-{time.time_ns()}"
    body = {"model": "demo", "prompt": "Write a haiku about replicas.", "max_tokens": 12, "temperature": 1.0}
    headers = {**auth("acme"), "Idempotency-Key": key}
    first = httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=120)
    retry = httpx.post(base + "/v1/completions", json=body, headers=headers, timeout=120)
    reused = httpx.post(base + "/v1/completions", json={**body, "prompt": "Something else."}, headers=headers,
                        timeout=120)
    # a retry while the first still runs: a long request, and the same key while it streams
    key2 = f"demo-running-{time.time_ns()}"
    long_body = {"model": "demo", "prompt": "Count slowly.", "max_tokens": 100, "ignore_eos": True, "stream": True}
    h2 = {**auth("acme"), "Idempotency-Key": key2}
    with httpx.stream("POST", base + "/v1/completions", json=long_body, headers=h2, timeout=120) as running:
        lines = running.iter_lines()
        next(lines)  # the first event: it is running
        during = httpx.post(base + "/v1/completions", json=long_body, headers=h2, timeout=120)
        for _ in lines:
            pass
    report.idempotency = {
        "first": {"status": first.status_code, "replica": replica(first)},
        "retry": {"status": retry.status_code, "replica": replica(retry),
                  "replayed": retry.headers.get("idempotent-replayed"), "same_body": retry.text == first.text},
        "other_body_same_key": reused.status_code,
        "retry_while_running": {"status": during.status_code, "replica": replica(during),
                                "first_replica": replica(running)},
    }
    return (first.status_code == 200 and retry.status_code == 200 and retry.text == first.text
            and retry.headers.get("idempotent-replayed") == "true"
            and replica(first) != replica(retry)
            and reused.status_code == 422 and during.status_code == 409
            and replica(during) != replica(running))


def usage_phase(base: str, replicas: list[subprocess.Popen], ports: list[int], args, report: Report) -> bool:
    killed_at: list[float] = []
    done = threading.Event()
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def killer() -> None:
        while not done.is_set():
            with lock:
                n = len(outcomes)
            if n >= args.requests // 3:
                replicas[1].send_signal(signal.SIGKILL)
                killed_at.append(n)
                return
            time.sleep(0.05)

    kill_thread = threading.Thread(target=killer, daemon=True)
    kill_thread.start()
    start = time.monotonic()
    with cf.ThreadPoolExecutor(args.concurrency) as pool:
        for out in pool.map(lambda i: one_request(base, i, args.max_tokens), range(args.requests)):
            with lock:
                outcomes.append(out)
    done.set()
    elapsed = time.monotonic() - start
    replicas[1].wait(10)

    r = httpx.get(base + "/v1/usage", params={"group_by": "user"}, headers=auth("ops"), timeout=30)
    r.raise_for_status()
    records = {row["user"]: row for row in r.json()["data"]}
    completed = [o for o in outcomes if o.completed]
    missing = [o.user for o in completed if o.user not in records]
    mismatched = [o.user for o in completed if o.user in records and (
        records[o.user]["prompt_tokens"] != o.prompt_tokens or records[o.user]["completion_tokens"] != o.completion_tokens
        or records[o.user]["requests"] != 1)]
    by_replica: dict[str, int] = {}
    for o in completed:
        by_replica[o.upstream] = by_replica.get(o.upstream, 0) + 1
    latencies = sorted(o.seconds for o in completed)
    report.usage = {
        "requests": len(outcomes), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "killed_replica": f"127.0.0.1:{ports[1]} (SIGKILL after {killed_at[0] if killed_at else '?'} requests ended)",
        "completed": len(completed), "completed_streams": sum(o.stream for o in completed),
        "not_completed": {str(k): v for k, v in _count(o.status for o in outcomes if not o.completed).items()},
        "completed_per_replica": by_replica,
        "usage_records_for_completed": len(completed) - len(missing), "missing_records": missing,
        "token_mismatches": mismatched,
        "records_of_requests_that_did_not_complete": sorted(set(records) & {o.user for o in outcomes if not o.completed}),
        "wall_seconds": round(elapsed, 2),
        "latency_p50_seconds": round(latencies[len(latencies) // 2], 3) if latencies else None,
        "latency_max_seconds": round(latencies[-1], 3) if latencies else None,
    }
    return bool(killed_at) and len(completed) > 0 and not missing and not mismatched and len(by_replica) == 2


def _count(items) -> dict:
    out: dict = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint for both replicas (default: the default model)")
    p.add_argument("--requests", type=int, default=40, help="requests of the usage phase")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    for program in ("redis-server", "nginx"):
        if shutil.which(program) is None and not Path("/usr/sbin", program).exists():
            print(f"replicas_demo: {program} not found (apt-get install redis-server nginx-light)", file=sys.stderr)
            return 2
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    report = Report()
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-replicas-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            redis_port = free_port()
            procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                                           "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                                          stdout=subprocess.DEVNULL))
            (tmp / "conveyor.toml").write_text(config_text(args.model))
            ports = [free_port(), free_port()]
            replicas = []
            for i, port in enumerate(ports):
                cmd = [sys.executable, "-m", "conveyor", "serve", "--config", str(tmp / "conveyor.toml"),
                       "--redis-url", f"redis://127.0.0.1:{redis_port}/0", "--port", str(port),
                       "--kv-cache-memory", "256MiB", "--num-threads", "1", "--log-level", "warning"]
                log = open(tmp / f"replica{i}.log", "w")
                replicas.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            procs.extend(replicas)
            launched = time.monotonic()  # both load at once; seconds from launch to each one's /ready 200
            for i, (port, proc) in enumerate(zip(ports, replicas)):
                wait_ready(f"http://127.0.0.1:{port}", proc, args.startup_timeout, tmp / f"replica{i}.log")
                report.startup_seconds.append(round(time.monotonic() - launched, 1))
            lb_port = free_port()
            (tmp / "nginx.conf").write_text(nginx_conf(tmp, lb_port, ports))
            procs.append(subprocess.Popen([nginx, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                                          stdout=subprocess.DEVNULL, stderr=open(tmp / "nginx.stderr", "w")))
            base = f"http://127.0.0.1:{lb_port}"
            wait_ready(base, procs[-1], 30)
            report.checks["rate_limit_across_replicas"] = rate_limit_phase(base, report)
            report.checks["idempotency_across_replicas"] = idempotency_phase(base, report)
            report.checks["no_completed_request_loses_its_usage_record"] = usage_phase(base, replicas, ports, args,
                                                                                      report)
        finally:
            for proc in reversed(procs):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    text = json.dumps(asdict(report), indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = all(report.checks.values()) and len(report.checks) == 3
    print("replicas_demo:", "all checks passed" if ok else f"FAILED: {report.checks}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
