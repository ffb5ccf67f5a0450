"""The atlas viewer: a FastAPI app over one atlas file, read-only.

Routes::

    GET  /                       the single-page viewer (static/index.html + app.js)
    GET  /feature/{id}           a linkable feature URL (redirects to /#/f/{id})
    GET  /api/meta               model, hook, SAE config, metrics, density histogram
    GET  /api/features           the feature list: sort, order, q (label/explanation text),
                                 min_density, max_density, offset, limit
    GET  /api/feature/{id}       one feature's page (stored gzip'd; sent as is)
    GET  /api/schema             JSON schemas of a page and of the meta (saelab.analyse.page)
    GET  /api/search?q=          by id, by label/explanation text, by token
    POST /api/live {"text": …}   the SAE run live on the text: features per token
    POST /api/steer {"feature", "prompt", "mode", "value", "max_new_tokens"}
                                 greedy continuations of the prompt, clean and steered
    POST /api/attribute {"text", "target"}
                                 which features drive the next-token logit of target
                                 (default: the model's prediction), per token
    GET  /api/relatives/{id}     the feature's closest features in other dictionaries
                                 (recorded by `saelab study monosemanticity`)
    GET  /d/{name}/...           a companion atlas (``serve_atlases``), e.g. the neurons or
                                 another dictionary size, the same viewer without the model

Every query is parameterised; no route takes a file path, and the static files come from
the package folder only. The model routes bound their input (characters, tokens, new
tokens) and run one request at a time, answering 503 when busy for longer than
``live_wait`` seconds.
"""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from saelab.analyse.atlasdb import SORTS, Atlas
from saelab.analyse.page import schema
from saelab.errors import SaelabError

STATIC = Path(__file__).parent / "static"
MAX_NEW_TOKENS = 64
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


class SteerRequest(BaseModel):
    feature: int = Field(ge=0, description="The feature to change.")
    prompt: str = Field(min_length=1, description="Text to continue.")
    mode: Literal["clamp", "scale", "ablate", "add"] = Field(
        default="clamp", description="clamp to value, scale by value, ablate, or add value x its direction."
    )
    value: float = Field(default=0.0, ge=-1e4, le=1e4, description="The strength.")
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate.")


class AttributeRequest(BaseModel):
    text: str = Field(min_length=1, description="The prompt whose next token is explained.")
    target: str | None = Field(
        default=None, max_length=64, description="Token to explain [default: the model's prediction]."
    )


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
        from saelab.analyse.text import features_on_text

        r = features_on_text(self.lm, self.sae, self.hook, text, self.max_tokens, per_token=top)
        return {"tokens": r.tokens, "features": r.per_token, "truncated": r.truncated, "top": r.top}

    def tokens_of(self, text: str) -> tuple[str, bool]:
        """``text`` cut to the token limit, and whether it was cut."""
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.max_tokens:
            return text, False
        return self.lm.tokenizer.decode(ids[: self.max_tokens]), True

    def steer(self, req: SteerRequest) -> dict[str, Any]:
        from saelab.steer import Edit, generate

        prompt, truncated = self.tokens_of(req.prompt)
        edit = Edit(req.feature, req.mode, req.value)
        c = generate(self.lm, self.sae, self.hook, prompt, [edit], max_new_tokens=req.max_new_tokens)
        return {"prompt": prompt, "truncated": truncated, "clean": c.clean, "steered": c.steered,
                "feature": req.feature, "mode": req.mode, "value": req.value}

    def attribute(self, req: AttributeRequest, top: int = 8) -> dict[str, Any]:
        from saelab.steer import attribute

        a = attribute(self.lm, self.sae, self.hook, req.text, target=req.target, top=top,
                      max_tokens=self.max_tokens)
        return {"tokens": a.tokens, "target": a.target, "target_id": a.target_id, "logit": round(a.logit, 4),
                "features": a.per_token, "top": a.top}


def _load_live(atlas: Atlas, sae_dir: str | None, device: str, max_chars: int, max_tokens: int,
               lm: Any = None) -> LiveModel:
    from saelab.models import open_model
    from saelab.sae.base import SAE

    path = sae_dir or atlas.meta["sae"]["path"]
    sae = SAE.load(path)
    lm = lm or open_model(atlas.meta["model"], device)
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
    lm: Any = None,
    dictionaries: dict[str, str] | None = None,
    current: str | None = None,
) -> FastAPI:
    """The viewer app for the atlas at ``atlas_path``. With ``live``, the SAE (from the path
    the atlas records, or ``sae_dir``) and its model (or ``lm``, already loaded) load at
    startup for the text box, steering and attribution. ``dictionaries`` ({name: URL}) are
    the atlases served beside this one (``current`` names this one), linked from the page."""
    atlas = Atlas(atlas_path)
    served = dict(dictionaries or {})
    state: dict[str, Any] = {"live": None, "live_error": None if live else "started with --no-live"}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if live:
            try:
                state["live"] = _load_live(atlas, sae_dir, device, max_chars, max_tokens, lm)
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
            "steer": state["live"] is not None and bool(state["live"].lm.causal),
            "max_new_tokens": MAX_NEW_TOKENS,
            "live_error": state["live_error"],
            "max_chars": max_chars,
            "max_tokens": max_tokens,
            "dictionaries": served,
            "current": current,
        }

    @app.get("/api/schema")
    def page_schema() -> dict[str, Any]:
        return schema()

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

    def with_model(text: str, work: Callable[[LiveModel], dict[str, Any]]) -> dict[str, Any]:
        """Run ``work`` on the live model: bounded input, one request at a time, timed, with
        the labels of every feature the answer names."""
        lm: LiveModel | None = state["live"]
        if lm is None:
            raise HTTPException(503, state["live_error"] or "the live model is off")
        if len(text) > lm.max_chars:
            raise HTTPException(413, f"text is {len(text)} characters; the limit is {lm.max_chars}")
        if not lm.lock.acquire(timeout=live_wait):
            raise HTTPException(503, "the model is busy with other requests; try again")
        try:
            t0 = time.perf_counter()
            out = work(lm)
            out["seconds"] = round(time.perf_counter() - t0, 3)
        except SaelabError as e:
            raise HTTPException(422, str(e)) from None
        finally:
            lm.lock.release()
        ids = {i for tok in out.get("features", []) for i, _ in tok} | {i for i, _ in out.get("top", [])}
        ids |= {out["feature"]} if "feature" in out else set()
        out["labels"] = {str(k): v for k, v in atlas.labels(sorted(ids)).items()}
        return out

    @app.post("/api/live")
    def live_run(req: LiveRequest) -> JSONResponse:
        return JSONResponse(with_model(req.text, lambda lm: lm.run(req.text)))

    @app.post("/api/steer")
    def steer(req: SteerRequest) -> JSONResponse:
        if req.feature >= atlas.n_features:
            raise HTTPException(404, f"no feature {req.feature} (the atlas has 0 to {atlas.n_features - 1})")
        return JSONResponse(with_model(req.prompt, lambda lm: lm.steer(req)))

    @app.post("/api/attribute")
    def attribute(req: AttributeRequest) -> JSONResponse:
        return JSONResponse(with_model(req.text, lambda lm: lm.attribute(req)))

    @app.get("/api/relatives/{fid}")
    def relatives(fid: int) -> dict[str, Any]:
        if not 0 <= fid < atlas.n_features:
            raise HTTPException(404, f"no feature {fid} (the atlas has 0 to {atlas.n_features - 1})")
        items = atlas.relatives(fid)
        for r in items:
            r["url"] = served.get(r["dictionary"])
        return {"feature": fid, "items": items}

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve_atlases(atlas_path: str | Path, companions: dict[str, Path], name: str | None = None,
                  **live: Any) -> FastAPI:
    """The viewer of ``atlas_path`` at / with each companion atlas at /d/{name}/ (read-only,
    no live model), each page linking to the others."""
    main_name = name or Path(atlas_path).stem
    if main_name in companions:
        raise SaelabError(f"two atlases are called {main_name!r}; name them apart (--with NAME=ATLAS)")
    urls = {main_name: "/", **{n: f"/d/{n}/" for n in companions}}
    app = create_app(atlas_path, dictionaries=urls, current=main_name, **live)
    for n, path in companions.items():
        app.mount(f"/d/{n}", create_app(path, live=False, dictionaries=urls, current=n))

        def slash(n: str = n) -> RedirectResponse:
            return RedirectResponse(f"/d/{n}/")

        app.add_api_route(f"/d/{n}", slash, include_in_schema=False)
    # A mount is matched before later routes: put the redirects first.
    app.router.routes.sort(key=lambda r: 0 if getattr(r, "path", "").startswith("/d/") and
                           not hasattr(r, "app") else 1)
    return app
