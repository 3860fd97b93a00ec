"""The server's two web pages, served offline from files in this package and an installed one.

- `GET /`: the chat playground (server/static/playground.*), which talks to the public API
  like any client: `/v1/models` for the model list, `/v1/chat/completions` with SSE streaming.
- `GET /docs`: Swagger UI rendering `/openapi.json` as an interactive console. Swagger UI's
  assets come from the PyPI package `swagger-ui-py` (its `static/` folder), served under
  `/static/swagger-ui/`, so the page needs no network beyond this server.

Neither page embeds anything from another origin; both are plain files (no templating), so what
the browser runs is exactly what is in the repository and the installed package.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
SWAGGER_UI_PREFIX = "/static/swagger-ui"


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's built assets (swagger-ui-bundle.js, swagger-ui.css) inside
    the installed `swagger-ui-py` package."""
    try:
        return Path(str(importlib.resources.files("swagger_ui") / "static"))
    except ModuleNotFoundError:
        raise RuntimeError("/docs needs the swagger-ui-py package (a dependency of conveyor): "
                           "pip install 'swagger-ui-py>=25.7'") from None


def _page(name: str):
    """An endpoint answering one HTML file of server/static; never cached, so an upgraded
    server is never paired with a stale page."""
    async def endpoint(request: Request) -> Response:
        return FileResponse(STATIC_DIR / name, media_type="text/html",
                            headers={"Cache-Control": "no-cache"})
    return endpoint


def page_routes() -> list[BaseRoute]:
    """`/`, `/docs` and the static files they load. The Swagger UI mount comes before
    `/static` because a mount matches every path below its prefix."""
    return [
        Route("/", _page("playground.html"), methods=["GET"]),
        Route("/docs", _page("api-docs.html"), methods=["GET"]),
        Mount(SWAGGER_UI_PREFIX, StaticFiles(directory=swagger_ui_dir()), name="swagger-ui"),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
