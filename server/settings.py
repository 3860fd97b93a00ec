"""Server-wide settings: limits and names that apply to every request."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerSettings:
    """`None` for a cap means "no cap beyond the model's context"."""

    served_model_name: str | None = None  # the name clients use; default: the engine's model name
    max_tokens_cap: int | None = None  # largest max_tokens a request may ask for
    max_prompt_tokens: int | None = None  # longest prompt accepted
    max_waiting_requests: int = 1024  # admitted requests not yet producing tokens
    max_waiting_tokens: int | None = None  # their prompt tokens together
    max_body_bytes: int = 4 * 1024 * 1024
    retry_after_seconds: int = 1
    shutdown_timeout: float = 30.0  # seconds running requests get after SIGTERM before being ended
    otlp_traces_endpoint: str | None = None  # OTLP/HTTP traces URL; None: the OTEL_* variables decide
    log_prompts: bool = False  # summary log lines carry prompt and output text (off: never logged)
    trace_file: str | None = None  # append one JSON line per finished request (server/trace_file.py)
    tool_call_parser: str | None = None  # server/tool_parsers/ name; None: chosen from the chat template
    # /health answers 503 when work has been pending this long with no engine step completing
    # (0: never). 120 s: a healthy step of the default model on CPU is at most one 2048-token
    # prefill chunk, ~8 s on 2 idle cores but 53-61 s measured on an oversubscribed 2-core box
    # (benchmarks/RESULTS.md); a false alarm restarts the pod mid-request, so err long.
    health_stall_seconds: float = 120.0

    def __post_init__(self) -> None:
        for name in ("max_tokens_cap", "max_prompt_tokens", "max_waiting_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if not self.health_stall_seconds >= 0:
            raise ValueError(f"health_stall_seconds must be >= 0 seconds (0 disables the check), "
                             f"got {self.health_stall_seconds}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        for name in ("max_waiting_requests", "max_body_bytes", "retry_after_seconds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
