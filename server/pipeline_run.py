"""`PipelineRun`: one generation request on its way through the gateway's pipeline
(server/gateway.py): what each stage learned about it, and what the settle step needs."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from engine.outputs import RequestOutput
from server.config_file import TenantConfig
from server.formatting import Formatter
from server.protocol import GenerationRequest
from server.rate_limit import Reservation
from server.recorded import RecordedResponse
from server.request_trace import RequestTrace
from server.served_models import ModelHandle


@dataclass(eq=False)
class PipelineRun:
    request: Request
    tenant: TenantConfig
    req: GenerationRequest
    body: dict
    canonical: dict[str, Any]  # the request as idempotency and the cache see it
    log: logging.LoggerAdapter
    trace: RequestTrace
    key: str | None = None  # Idempotency-Key, validated
    owns_key: bool = False  # this request must complete or abandon the key
    headers: dict[str, str] = field(default_factory=dict)  # added to the response
    model: ModelHandle | None = None
    formatter: Formatter | None = None
    api: Any = None  # another API served on this pipeline (server/responses/api.py); None: chat / completions
    reservation: Reservation | None = None
    cache_fp: str | None = None  # set when the request is cacheable
    leading: bool = False  # runs the engine for an in-flight dedup group
    last: RequestOutput | None = None  # the latest engine output
    answer: RecordedResponse | None = None  # the completed response, however it was produced
    source: str = "engine"  # engine | response (cache) | dedup
    deadline: float | None = None  # the request's own `timeout`, event-loop time
    waiting: Any = None  # the asyncio.Timeout of the current wait for an engine output
    streaming: bool = False  # the stream's headers are out: Starlette notices disconnects

    @property
    def keeps_answer(self) -> bool:
        return self.owns_key or self.cache_fp is not None

    def client_gone(self) -> None:
        """The client disconnected: traced, logged, and counted as a 499 by the access metric."""
        self.trace.gone()
        self.log.info("client disconnected, aborted")
        self.request.scope["state"]["client_gone"] = True
