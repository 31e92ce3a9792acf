"""The steering playground: a static page served at /playground on the server's own port.

Plain HTML, CSS and JavaScript shipped inside the package (no build step, no framework, nothing
fetched from elsewhere): the page talks only to this server's public API (/v1/models, /v1/saes,
/v1/features..., /v1/chat/completions with `feature_clamps` and `return_features`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

PAGE_DIR = Path(__file__).parent / "playground"


def attach(app: FastAPI) -> None:
    @app.get("/playground", include_in_schema=False)
    async def playground() -> RedirectResponse:
        return RedirectResponse(url="playground/")  # relative: works under --root-path too

    app.mount("/playground/", StaticFiles(directory=PAGE_DIR, html=True), name="playground")
