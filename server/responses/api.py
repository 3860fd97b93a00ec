"""`POST /v1/responses` on the gateway's pipeline: the same auth, idempotency keys, input
guards, routing, rate limits, cache, output guards and settle as `/v1/chat/completions`
(server/gateway.py), with the body parsed by server/responses/request.py and answers built by
server/responses/formatter.py. Errors name the Responses field the client sent (`input`,
`max_output_tokens`, `text.format...`), not the chat field it became."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from server.errors import APIError
from server.responses.formatter import ResponsesFormatter
from server.responses.request import ResponsesRequest, rename_param


@dataclass
class ResponsesAPI:
    gateway: Any  # server.gateway.Gateway
    name: str = "responses"  # the endpoint, as idempotency keys and the response cache see it

    async def handle(self, request: Request) -> Response:
        try:
            return await self.gateway.handle(request, chat=True, api=self)
        except APIError as exc:  # refusals after parsing (context length, max_tokens caps) name chat fields
            exc.param = rename_param(exc.param)
            raise

    def parse(self, body: Any) -> ResponsesRequest:
        return ResponsesRequest.from_responses(body)

    def formatter(self, model: Any, req: ResponsesRequest, request_id: str) -> ResponsesFormatter:
        return ResponsesFormatter(f"resp_{request_id}", model.name, req.echo, self._tool_parser(model, req))

    @staticmethod
    def _tool_parser(model: Any, req: ResponsesRequest) -> Any:
        """Makes the request's tool-call parser (None without tools, or with tool_choice none)."""
        tools = getattr(req, "tools", None)
        if tools is None or tools.choice == "none":
            return None
        from server.tool_parsers import default_parser_name  # only requests with tools need it

        name = getattr(model.service.settings, "tool_call_parser", None) or default_parser_name(
            getattr(model.engine.tokenizer, "chat_template", None))
        return lambda: tools.parser(name)
