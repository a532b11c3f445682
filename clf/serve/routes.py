"""The HTTP face of a replica: routes, status codes and the one-line JSON errors.

Built in the replica once its model is loading (``ClassifierReplica.__serve_build_asgi_app__``),
so the routes close over the replica itself rather than over a copy that Serve pickled.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from clf.serve import uploads
from clf.serve.telemetry import CONTENT_TYPE
from clf.serve.uploads import RequestError


def http_app(replica: Any) -> CountRequests:
    """The routes of ``replica``, a ``clf.serve.replica.ClassifierReplica``."""
    app = FastAPI(title="clf", docs_url=None, redoc_url=None, openapi_url=None)
    limit = replica.cfg.max_body_bytes

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"model": replica.model_id, "top": [], "error": message}, status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if replica.model is not None:
            return JSONResponse({"ready": True, "error": None})
        return JSONResponse({"ready": False, "error": replica.not_ready_reason()}, 503)

    @app.get("/metadata")
    async def metadata() -> dict[str, Any]:
        return replica.metadata()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(replica.telemetry.text(), media_type=CONTENT_TYPE)

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        try:
            k = replica.top_k_of(request.query_params.get("k"))
            with replica.admitted():
                top = await replica.classify(await uploads.one_image(request, limit), k)
        except RequestError as e:
            return error(e.status, str(e))
        return JSONResponse({"model": replica.model_id, "top": top, "error": None})

    @app.post("/predict/batch")
    async def predict_batch(request: Request) -> JSONResponse:
        try:
            k = replica.top_k_of(request.query_params.get("k"))
            with replica.admitted():
                files = await uploads.many_images(request, limit)
                results = await asyncio.gather(*(answer(f, k) for f in files))
        except RequestError as e:
            return error(e.status, str(e))
        return JSONResponse({"model": replica.model_id, "results": results, "error": None})

    async def answer(upload: uploads.Upload, k: int) -> dict[str, Any]:
        """One file of a batch request: its own error never fails the others."""
        result = {"file": upload.filename, "top": [], "error": upload.error}
        if upload.error is None:
            try:
                result["top"] = await replica.classify(upload.data, k)
            except RequestError as e:
                result["error"] = str(e)
        return result

    return CountRequests(app, replica.telemetry)


class CountRequests:
    """Counts each HTTP answer by route and status, with its latency. Plain ASGI: Starlette's
    ``BaseHTTPMiddleware`` would copy every request and answer through extra streams."""

    def __init__(self, app: FastAPI, telemetry):
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope.get("route")  # the route's template, never the raw path of a 404
            name = route.path if route is not None else "unmatched"
            self.telemetry.answered(name, status, time.perf_counter() - started)
