"""The atlas viewer: a FastAPI app over one atlas file, read-only.

Routes::

    GET  /                       the single-page viewer (static/index.html + app.js)
    GET  /feature/{id}           a linkable feature URL (redirects to /#/f/{id})
    GET  /api/meta               model, hook, SAE config, metrics, density histogram
    GET  /api/features           the feature list: sort, order, q (label/explanation text),
                                 min_density, max_density, offset, limit
    GET  /api/feature/{id}       one feature's page (stored gzip'd; sent as is)
    GET  /api/search?q=          by id, by label/explanation text, by token
    POST /api/live {"text": …}   the SAE run live on the text: features per token

Every query is parameterised; no route takes a file path, and the static files come from
the package folder only. The live route bounds its input (characters and tokens) and runs
one request at a time, answering 503 when busy for longer than ``live_wait`` seconds.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from saelab.analyse.atlasdb import SORTS, Atlas
from saelab.errors import SaelabError

STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; "
        b"img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware) adding the headers above."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LiveRequest(BaseModel):
    text: str = Field(description="Text to run through the model and SAE.")


@dataclass
class LiveModel:
    """The SAE and its model, loaded for the live text box."""

    sae: Any
    lm: Any
    hook: str
    max_chars: int
    max_tokens: int
    lock: threading.Lock

    def run(self, text: str, top: int = 8) -> dict[str, Any]:
        from saelab.activations.hooks import run_hooked

        tok = self.lm.tokenizer
        fmt = self.lm.window_format()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        truncated = len(ids) > self.max_tokens
        ids = ids[: self.max_tokens]
        full = (
            ([fmt.bos_id] if fmt.bos_id is not None else [])
            + ids
            + ([fmt.end_id] if fmt.end_id is not None else [])
        )
        start = 1 if fmt.bos_id is not None else 0
        dev = self.lm.device
        with torch.no_grad():
            t = torch.tensor([full], device=dev)
            cap, _ = run_hooked(self.lm.model, t, torch.ones_like(t), capture=[self.hook])
            z = self.sae.encode(cap[self.hook][0, start : start + len(ids)].float())
        vals, idx = z.topk(min(top, z.shape[1]), dim=1)
        per_token = [
            [[int(i), round(float(v), 3)] for v, i in zip(vr.tolist(), ir.tolist(), strict=True) if v > 0]
            for vr, ir in zip(vals, idx, strict=True)
        ]
        peak = z.amax(0) if len(ids) else torch.zeros(z.shape[1])
        pv, pi = peak.topk(min(20, peak.numel()))
        return {
            "tokens": [tok.decode([i]) for i in ids],
            "features": per_token,
            "truncated": truncated,
            "top": [
                [int(i), round(float(v), 3)] for v, i in zip(pv.tolist(), pi.tolist(), strict=True) if v > 0
            ],
        }


def _load_live(atlas: Atlas, sae_dir: str | None, device: str, max_chars: int, max_tokens: int) -> LiveModel:
    from saelab.activations.harvest import open_model
    from saelab.sae.base import SAE

    path = sae_dir or atlas.meta["sae"]["path"]
    sae = SAE.load(path)
    lm = open_model(atlas.meta["model"], device)
    return LiveModel(
        sae.to(lm.device).eval(), lm, atlas.meta["hook_name"], max_chars, max_tokens, threading.Lock()
    )


def create_app(
    atlas_path: str | Path,
    live: bool = True,
    sae_dir: str | None = None,
    device: str = "auto",
    max_chars: int = 2000,
    max_tokens: int = 256,
    live_wait: float = 10.0,
) -> FastAPI:
    """The viewer app for the atlas at ``atlas_path``. With ``live``, the SAE (from the path
    the atlas records, or ``sae_dir``) and its model load at startup for the text box."""
    atlas = Atlas(atlas_path)
    state: dict[str, Any] = {"live": None, "live_error": None if live else "started with --no-live"}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if live:
            try:
                state["live"] = _load_live(atlas, sae_dir, device, max_chars, max_tokens)
            except (SaelabError, OSError) as e:
                state["live_error"] = f"the live text box is off: {e}"
        yield

    app = FastAPI(title="saelab atlas", lifespan=lifespan, docs_url="/api/docs", redoc_url=None)
    app.add_middleware(SecurityHeaders)
    index = (STATIC / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return Response(index, media_type="text/html; charset=utf-8")

    @app.get("/feature/{fid}", include_in_schema=False)
    def feature_link(fid: int) -> RedirectResponse:
        return RedirectResponse(f"/#/f/{fid}")

    @app.get("/api/meta")
    def meta() -> dict[str, Any]:
        return {
            **atlas.meta,
            "live": state["live"] is not None,
            "live_error": state["live_error"],
            "max_chars": max_chars,
            "max_tokens": max_tokens,
        }

    @app.get("/api/features")
    def features(
        sort: str = Query("density", pattern=f"^({'|'.join(SORTS)})$"),
        order: str = Query("desc", pattern="^(asc|desc)$"),
        q: str | None = Query(None, max_length=200),
        min_density: float | None = None,
        max_density: float | None = None,
        offset: int = Query(0, ge=0),
        limit: int = Query(50, ge=1, le=500),
    ) -> dict[str, Any]:
        total, items = atlas.list_features(sort, order == "desc", q, min_density, max_density, offset, limit)
        return {"total": total, "offset": offset, "items": items}

    @app.get("/api/feature/{fid}")
    def feature(fid: int, request: Request) -> Response:
        raw = atlas.page_gz(fid)
        if raw is None:
            raise HTTPException(404, f"no feature {fid} (the atlas has 0 to {atlas.n_features - 1})")
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(raw, media_type="application/json", headers={"content-encoding": "gzip"})
        return Response(gzip.decompress(raw), media_type="application/json")

    @app.get("/api/search")
    def search(q: str = Query(..., min_length=1, max_length=200)) -> dict[str, Any]:
        q = q.strip()
        by_id = None
        if q.lstrip("#").isdigit() and int(q.lstrip("#")) < atlas.n_features:
            fid = int(q.lstrip("#"))
            by_id = {"id": fid, "label": atlas.labels([fid]).get(fid)}
        _, by_label = atlas.list_features("density", True, q, limit=50)
        return {"q": q, "by_id": by_id, "by_label": by_label, "by_token": atlas.features_with_token(q)}

    @app.post("/api/live")
    def live_run(req: LiveRequest) -> JSONResponse:
        lm: LiveModel | None = state["live"]
        if lm is None:
            raise HTTPException(503, state["live_error"] or "the live text box is off")
        if len(req.text) > lm.max_chars:
            raise HTTPException(413, f"text is {len(req.text)} characters; the limit is {lm.max_chars}")
        if not lm.lock.acquire(timeout=live_wait):
            raise HTTPException(503, "the model is busy with other requests; try again")
        try:
            t0 = time.perf_counter()
            out = lm.run(req.text)
            out["seconds"] = round(time.perf_counter() - t0, 3)
        finally:
            lm.lock.release()
        ids = {i for tok in out["features"] for i, _ in tok} | {i for i, _ in out["top"]}
        out["labels"] = {str(k): v for k, v in atlas.labels(sorted(ids)).items()}
        return JSONResponse(out)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
