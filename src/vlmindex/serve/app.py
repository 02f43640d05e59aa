"""The FastAPI application of ``vlmindex serve``: routes that parse, call the service, and answer JSON.

Every error is one line of JSON, ``{"error": ..., "choices": [...]}``, with the status the service
chose (400 bad input, 404 unknown name, 409 stale or unusable index, 413 too large, 503 busy).
No route takes a file-system path: images are named by ``image_id``, indexes by model, dataset
and condition, all checked against the catalog.
"""

from __future__ import annotations

import json
import mimetypes
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmindex import __version__
from vlmindex.catalog import CLEAN, RunKey
from vlmindex.serve.service import BadRequest, NeighbourService, NotFound, ServiceError, TooLarge, explore_app

FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields beside the file


def _error(status: int, message: str, choices: list[str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if choices is not None:
        body["choices"] = choices
    return JSONResponse(body, status_code=status)


def _int(value: Any, name: str, default: int | None = None) -> int | None:
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{name}={value!r} is not an integer") from None
    if not 0 <= number < 2**63:  # image ids are BIGINT hashes, k a small count
        raise BadRequest(f"{name}={value!r} is out of range")
    return number


def _models(value: Any) -> list[str] | None:
    if value in (None, ""):
        return None
    if isinstance(value, list):
        return [str(v) for v in value]
    return [m.strip() for m in str(value).split(",") if m.strip()]


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is longer than ``limit``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request is {declared} bytes; uploads are limited to {limit - FORM_OVERHEAD} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the request is over {limit} bytes; uploads are limited to {limit - FORM_OVERHEAD} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: NeighbourService) -> FastAPI:
    """The application over one service (one workspace)."""
    app = FastAPI(title="vlmindex", version=__version__, docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    app.state.service = service

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.choices)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("path", "query", "body"))
        return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # a bug, not the caller's fault: still one line of JSON, and no paths or traceback
        return _error(500, service.public(f"internal error: {type(exc).__name__}"))

    @app.get("/api/datasets")
    def datasets() -> dict[str, Any]:
        return {"datasets": service.datasets()}

    @app.get("/api/models")
    def models(dataset: str) -> dict[str, Any]:
        return {"dataset": dataset, "models": service.models(dataset)}

    @app.get("/api/leaderboard")
    def leaderboard(dataset: str) -> dict[str, Any]:
        return {"dataset": dataset, "rows": service.leaderboard(dataset)}

    @app.post("/api/knn")
    async def knn(request: Request) -> JSONResponse:
        params: dict[str, Any] = dict(request.query_params)
        upload = None
        kind = request.headers.get("content-type", "")
        body = await _body(request, service.limits.max_bytes + FORM_OVERHEAD)
        if kind.startswith("multipart/form-data"):
            request._body = body  # the form parser replays the body already read (and measured)
            async with request.form(max_files=1, max_fields=16) as form:
                for name, value in form.multi_items():
                    if name == "file":
                        if not hasattr(value, "read"):
                            raise BadRequest("'file' must be an uploaded file")
                        upload = await value.read()
                    else:
                        params[name] = value
            if upload is None:
                raise BadRequest("the form has no 'file'; send the image as a file field named 'file'")
            if len(upload) > service.limits.max_bytes:
                raise TooLarge(f"the upload is {len(upload)} bytes; the limit is {service.limits.max_bytes}")
        elif body:
            try:
                data = json.loads(body)
            except ValueError:
                raise BadRequest("the body is neither JSON nor a multipart form with an image 'file'") from None
            if not isinstance(data, dict):
                raise BadRequest("the JSON body must be an object such as {\"image_id\": 3, \"dataset\": \"demo\"}")
            params.update(data)
        dataset = params.get("dataset")
        if not dataset:
            raise BadRequest("give the 'dataset' to search", service.dataset_names())
        image_id = _int(params.get("image_id"), "image_id")
        if upload is None and image_id is None:
            raise BadRequest("give an 'image_id' (JSON) or upload an image as 'file' (multipart)")
        # plain JSON of plain values: FastAPI's generic encoder would cost more than the search
        return JSONResponse(await run_in_threadpool(
            service.knn, str(dataset), models=_models(params.get("models")),
            condition=str(params.get("condition") or CLEAN), k=_int(params.get("k"), "k", 10),
            image_id=None if upload is not None else image_id, upload=upload,
            label=str(params["label"]) if params.get("label") else None))

    @app.get("/api/images/{image_id}/thumbnail")
    def thumbnail(image_id: str, condition: str = CLEAN, size: str = "96") -> Response:
        png = service.thumbnail_png(_int(image_id, "image_id"), condition, _int(size, "size"))
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/explore/{model}")
    def explore(model: str, dataset: str, condition: str = CLEAN) -> Response:
        """The model's published explorer, or how to open one."""
        key = _indexed(service, model, dataset, condition)
        if explore_app(service.ws, key) is not None:
            names = (quote(n, safe="") for n in (model, dataset, condition))  # names may hold '/', '#', '?'
            return RedirectResponse("/explore/" + "/".join(names) + "/")
        cmd = f"vlmindex explore -m {model} -d {dataset} -c {condition}"
        return HTMLResponse(_explore_hint(model, dataset, condition, cmd))

    @app.get("/explore/{model}/{dataset}/{condition}/{asset:path}")
    def explore_asset(model: str, dataset: str, condition: str, asset: str) -> Response:
        key = _indexed(service, model, dataset, condition)
        root = explore_app(service.ws, key)
        if root is None:
            raise NotFound(f"no explorer published for {key}; run `vlmindex explore -m {model} -d {dataset} "
                           f"-c {condition} --publish`")
        target = (root / (asset or "index.html")).resolve()
        if not target.is_relative_to(root.resolve()) or not target.is_file():
            raise NotFound(f"no file {asset!r} in the explorer of {key}")
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            kind = "application/wasm"
        return FileResponse(target, media_type=kind)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return resources.files("vlmindex.serve").joinpath("page.html").read_text(encoding="utf-8")

    return app


def _indexed(service: NeighbourService, model: str, dataset: str, condition: str) -> RunKey:
    service.require_dataset(dataset)
    known = sorted({i.model for i in service.indexes(dataset)})
    if model not in known:
        raise NotFound(f"no index of {model!r} on {dataset!r}", known)
    conditions = service.condition_names(dataset)
    if condition not in conditions:
        raise NotFound(f"unknown condition {condition!r} for dataset {dataset!r}", conditions)
    return RunKey(model, dataset, condition)


def _explore_hint(model: str, dataset: str, condition: str, cmd: str) -> str:
    from html import escape

    return (f"<!doctype html><meta charset='utf-8'><title>explore {escape(model)}</title>"
            f"<body style='font-family:system-ui;max-width:44em;margin:3em auto'>"
            f"<h1>Explore {escape(model)} on {escape(dataset)}/{escape(condition)}</h1>"
            f"<p>Open Embedding Atlas on this run (map, neighbours, thumbnails, metrics) with</p>"
            f"<pre>{escape(cmd)}</pre><p>or publish a static copy that this server then links to:</p>"
            f"<pre>{escape(cmd)} --publish</pre><p><a href='/'>back</a></p></body>")

