"""The request trace file (``conveyor serve --trace-file PATH``): one JSON line per finished
generation request, in the format the simulator (`engine.scheduler.traces.load_trace`) and
``benchmarks/replay.py`` read, so the same trace drives the server, the engine and the simulator.

Each line holds when the request arrived (``arrival_time``, Unix seconds), its prompt and output
lengths (``prompt_len``, ``output_len``), ``cached_tokens``, ``tenant``, ``priority``, ``model``,
``ttft_s``, ``finished_time``, ``finish_reason``, ``status`` and ``request_id``; ``model`` is the
name the request was served under (a LoRA adapter's name) and ``base_model`` the model that ran
it. It never holds prompt or output text, whatever ``--log-prompts`` says. Requests answered
without the engine (response cache, dedup, replay) and refused ones are written too, marked by
``source`` / ``status``, so a replay can choose to skip them (their ``output_len`` is what was sent).

Each line is appended with one ``write`` on a file opened with ``O_APPEND``, so lines of
concurrent writers (several server processes sharing a path) do not interleave.
"""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.request_trace import RequestTrace

TRACE_FIELDS = ("request_id", "arrival_time", "prompt_len", "output_len", "cached_tokens", "tenant",
                "priority", "model", "ttft_s", "finished_time", "finish_reason", "status", "source",
                "preemptions", "stream", "base_model")


def trace_line(trace: "RequestTrace", now: float) -> dict[str, Any]:
    """The trace-file record of one request (no text: lengths, times and labels only)."""
    out = trace.out
    m = out.metrics if out is not None else None
    reasons = [c.finish_reason for c in out.outputs] if out is not None else []
    first_token = m.first_token_time if m is not None else None
    return {
        "request_id": trace.request_id,
        "arrival_time": round(m.arrival_time if m is not None else trace.start, 6),
        "prompt_len": len(out.prompt_token_ids) if out is not None else 0,
        "output_len": sum(len(c.token_ids) for c in out.outputs) if out is not None else 0,
        "cached_tokens": out.num_cached_tokens if out is not None else 0,
        "tenant": trace.tenant,
        "priority": trace.priority,
        "model": trace.model,
        "ttft_s": round(first_token - m.arrival_time, 6) if first_token is not None else None,
        "finished_time": round(m.finished_time if m is not None and m.finished_time else now, 6),
        "finish_reason": ",".join(r or "abort" for r in reasons) or None,
        "status": trace.status,
        "source": trace.source,
        "preemptions": out.num_preemptions if out is not None else 0,
        "stream": trace.stream,
        "base_model": trace.base_model,
    }


def append_trace_line(path: str, trace: "RequestTrace", now: float) -> None:
    """Appends the request's line to ``path``. An I/O error is logged (``conveyor.request``
    logger) and never fails the request: the response has been sent already."""
    data = (json.dumps(trace_line(trace, now), separators=(",", ":")) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        logging.getLogger("conveyor.request").warning("trace file %s: %s", path, exc)
