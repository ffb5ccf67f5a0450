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
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as FPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import AfterValidator, BaseModel, Field

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


LOOPBACK = ("127.0.0.1", "localhost", "::1")
INT64 = 2**63 - 1  # the largest id SQLite can bind
FeatureId = Annotated[int, FPath(ge=-INT64 - 1, le=INT64)]


class Guard:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware) in front of every route:

    - the security headers above on every response, errors included;
    - the ``Host`` header must name this server (``hosts``, any port), so a page on another
      site whose DNS name rebinds to 127.0.0.1 cannot read the atlas or run the model;
    - a request body is limited to ``max_body`` bytes before it is read: a declared
      ``content-length`` above it is answered 413 at once, a streamed one is answered 413
      as soon as it passes the limit.
    """

    def __init__(self, app: Any, hosts: frozenset[str] | None, max_body: int) -> None:
        self.app, self.hosts, self.max_body = app, hosts, max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        headers = dict(scope.get("headers") or [])
        if self.hosts is not None and _host_name(headers.get(b"host", b"")) not in self.hosts:
            await _answer(send_with_headers, 421, "this viewer answers only to the names it is served at "
                          f"({', '.join(sorted(self.hosts))}); open it by one of them")
            return
        declared = headers.get(b"content-length", b"0")
        too_large = f"request bodies are limited to {self.max_body:,} bytes"
        if not declared.isdigit() or int(declared) > self.max_body:
            await _answer(send_with_headers, 413, too_large)
            return
        # Read the (small) body here, stopping at the limit, and hand it on whole.
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = bool(message.get("more_body"))
            if size > self.max_body:
                await _answer(send_with_headers, 413, too_large)
                return
        replay = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]

        async def replayed() -> dict:
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send_with_headers)


def _host_name(raw: bytes) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _answer(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def served_names(host: str) -> frozenset[str] | None:
    """The Host names a viewer listening on ``host`` answers to (None: any, on a wildcard address)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return frozenset({*LOOPBACK, host.lower().strip("[]")})


def _no_lone_surrogates(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
                         "which is not text") from None
    return text


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]


class LiveRequest(BaseModel):
    text: Text = Field(description="Text to run through the model and SAE.")


class SteerRequest(BaseModel):
    feature: int = Field(ge=0, le=INT64, description="The feature to change.")
    prompt: Text = Field(min_length=1, description="Text to continue.")
    mode: Literal["clamp", "scale", "ablate", "add"] = Field(
        default="clamp", description="clamp to value, scale by value, ablate, or add value x its direction."
    )
    value: float = Field(default=0.0, ge=-1e4, le=1e4, allow_inf_nan=False, description="The strength.")
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate.")


class AttributeRequest(BaseModel):
    text: Text = Field(min_length=1, description="The prompt whose next token is explained.")
    target: Text | None = Field(
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

    def tokens_of(self, text: str, limit: int) -> tuple[str, bool]:
        """``text`` cut to ``limit`` tokens, and whether it was cut."""
        ids = self.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text, False
        return self.lm.tokenizer.decode(ids[:limit]), True

    def steer(self, req: SteerRequest) -> dict[str, Any]:
        from saelab.steer import Edit, generate

        room = (self.lm.max_positions or 1 << 30) - 2 - req.max_new_tokens  # BOS, and the new tokens
        if room < 1:
            raise SaelabError(f"{self.lm.name} has {self.lm.max_positions} positions: ask for fewer than "
                              f"{req.max_new_tokens} new tokens")
        prompt, truncated = self.tokens_of(req.prompt, min(self.max_tokens, room))
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


def _load_live(atlas: Atlas, sae: Any, device: str, max_chars: int, max_tokens: int,
               lm: Any = None) -> LiveModel:
    """The live model; text is cut to what its position embeddings cover (BOS and an end
    token included)."""
    from saelab.models import open_model
    from saelab.sae.base import SAE

    sae = sae if sae is not None else SAE.load(atlas.meta["sae"]["path"])
    lm = lm or open_model(atlas.meta["model"], device)
    if lm.max_positions is not None:
        max_tokens = min(max_tokens, lm.max_positions - 2)
    return LiveModel(
        sae.to(lm.device).eval(), lm, atlas.meta["hook_name"], max_chars, max_tokens, threading.Lock()
    )


def matching_sae(atlas: Atlas, sae_dir: str | Path) -> Any:
    """The SAE at ``sae_dir``, refused unless it is as wide as the atlas's dictionary."""
    from saelab.sae.base import SAE

    sae = SAE.load(sae_dir)
    want = atlas.meta.get("sae", {})
    if sae.n_latents != atlas.n_features or (want.get("d_in") not in (None, sae.d_in)):
        raise SaelabError(
            f"--sae {sae_dir} has {sae.n_latents:,} latents reading d_in = {sae.d_in}, but the atlas "
            f"{atlas.path} describes {atlas.n_features:,} features of d_in = {want.get('d_in')}; give the "
            "SAE the atlas was built from")
    return sae


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
    hosts: frozenset[str] | None = frozenset(LOOPBACK),
    docs: bool = False,
) -> FastAPI:
    """The viewer app for the atlas at ``atlas_path``. With ``live``, the SAE (from the path
    the atlas records, or ``sae_dir``) and its model (or ``lm``, already loaded) load at
    startup for the text box, steering and attribution. ``dictionaries`` ({name: URL}) are
    the atlases served beside this one (``current`` names this one), linked from the page.
    ``hosts``: the names it answers to (None: any); ``docs``: serve /api/docs.

    The atlas is checked first (SQLite's quick_check and every page read back); a damaged
    one, or an ``sae_dir`` of another width, is refused here rather than failing per request."""
    atlas = Atlas(atlas_path)
    atlas.check()
    given_sae = matching_sae(atlas, sae_dir) if live and sae_dir is not None else None
    served = dict(dictionaries or {})
    state: dict[str, Any] = {"live": None, "live_error": None if live else "started with --no-live"}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if live:
            try:
                state["live"] = _load_live(atlas, given_sae, device, max_chars, max_tokens, lm)
            except (SaelabError, OSError) as e:
                state["live_error"] = f"the live text box is off: {e}"
        yield

    app = FastAPI(title="saelab atlas", lifespan=lifespan, redoc_url=None,
                  docs_url="/api/docs" if docs else None, openapi_url="/api/openapi.json" if docs else None)
    app.add_middleware(Guard, hosts=hosts, max_body=max(1 << 16, 12 * max_chars + 4096))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The default handler echoes the input back, and fails on NaN or Infinity in it.
        detail = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the request's fault: still JSON, still with the security headers.
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server's log"},
                            status_code=500, headers={k.decode(): v.decode() for k, v in SECURITY_HEADERS})
    index = (STATIC / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return Response(index, media_type="text/html; charset=utf-8")

    @app.get("/feature/{fid}", include_in_schema=False)
    def feature_link(fid: FeatureId) -> RedirectResponse:
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
        min_density: float | None = Query(None, allow_inf_nan=False),
        max_density: float | None = Query(None, allow_inf_nan=False),
        offset: int = Query(0, ge=0, le=INT64),
        limit: int = Query(50, ge=1, le=500),
    ) -> dict[str, Any]:
        total, items = atlas.list_features(sort, order == "desc", q, min_density, max_density, offset, limit)
        return {"total": total, "offset": offset, "items": items}

    @app.get("/api/feature/{fid}")
    def feature(fid: FeatureId, request: Request) -> Response:
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
    def relatives(fid: FeatureId) -> dict[str, Any]:
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
        app.mount(f"/d/{n}", create_app(path, live=False, dictionaries=urls, current=n, hosts=None))

        def slash(n: str = n) -> RedirectResponse:
            return RedirectResponse(f"/d/{n}/")

        app.add_api_route(f"/d/{n}", slash, include_in_schema=False)
    # A mount is matched before later routes: put the redirects first.
    app.router.routes.sort(key=lambda r: 0 if getattr(r, "path", "").startswith("/d/") and
                           not hasattr(r, "app") else 1)
    return app
