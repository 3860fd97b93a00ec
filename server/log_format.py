"""`--log-format json`: one JSON object per log line, for log pipelines that index fields.

Every line has `timestamp` (UTC, ISO-8601 with milliseconds), `level`, `logger`, `event` and
`message`; lines about a request add `request_id`, and `tenant` and `model` once known; the
per-request summary line (`event: "request_summary"`, server/request_trace.py) adds its fields
(status, finish_reason, token counts, ttft_s, total_s, preemptions, client_disconnected, ...).
The text format's `[request_id=...]` prefix is dropped from `message` and becomes the
`request_id` field (so lines logged without the request's fields, such as the access line, keep it).
"""
from __future__ import annotations

import datetime
import json
import logging
import re

_PREFIX = re.compile(r"^\[request_id=([^\]]*)\] ")
_FIELDS = ("request_id", "tenant", "model")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line = {"timestamp": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "level": record.levelname.lower(), "logger": record.name,
                "event": getattr(record, "event", None) or "log"}
        message = record.getMessage()
        prefix = _PREFIX.match(message)
        if prefix is not None:  # a request's line: the id is a field (also for lines logged without `extra`)
            message = message[prefix.end():]
            line["request_id"] = prefix.group(1)
        for name in _FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        # the summary line's text repeats its fields: the JSON line carries the fields alone
        line["message"] = "request summary" if line["event"] == "request_summary" else message
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def use_json_logs(logger: logging.Logger | None = None) -> None:
    """Formats every handler of `logger` (default: the root logger) as JSON lines."""
    for handler in (logger or logging.getLogger()).handlers:
        handler.setFormatter(JsonFormatter())
