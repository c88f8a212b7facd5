"""The FastAPI app: routes, auth, errors in OpenAI's shape, the body limit, metrics; the model behind one
:class:`~nexttok.server.scheduler.Scheduler`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from nexttok.distribution import Distribution
from nexttok.errors import NexttokError
from nexttok.report import predict_report
from nexttok.server import completions as cm
from nexttok.server import explore
from nexttok.server import translate as tr
from nexttok.server.metrics import Metrics
from nexttok.server.scheduler import Scheduler
from nexttok.server.schemas import (
    ChatRequest,
    CompareRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    NextTokenRequest,
    RanksRequest,
    StagesRequest,
    TokenizeRequest,
)

if TYPE_CHECKING:
    from nexttok.lm import LM


@dataclass(frozen=True)
class ServeSettings:
    """What ``nexttok serve``'s options set."""

    served_model_name: str = "default"
    api_key: str | None = None
    max_logprobs: int = 20
    max_n: int = 16
    max_batch: int = 16
    max_queue: int = 64
    max_body: int = 4 * 2**20
    retry_after: int = 1
    corpus: str | None = None  # a corpus index: answers carry their verbatim spans (nexttok.choices[i].corpus)
    min_span: int = 8


class Problem(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers


@dataclass
class Served:
    """One model the server serves: its name, the LM, the thread that owns it, and its cached scores."""

    name: str
    lm: LM
    scheduler: Scheduler
    scores: explore.ScoreCache = field(default_factory=explore.ScoreCache)
    spans: Callable[[list[int]], dict] | None = None  # with --corpus: an answer's ids -> its verbatim spans


class State:
    """The app's models, each with its scheduler, loaded in the background (in order) so ``/health`` can say 503
    meanwhile. The first is the one a request without ``model`` gets."""

    def __init__(self, loads: dict[str, Callable[[], LM]], settings: ServeSettings):
        self.settings, self.metrics = settings, Metrics()
        self.names = list(loads)
        self.models: dict[str, Served] = {}
        self.failed: str | None = None
        self.created = int(time.time())
        self._thread = threading.Thread(target=self._load, args=(loads,), name="nexttok-load", daemon=True)

    def _load(self, loads: dict[str, Callable[[], LM]]) -> None:
        try:
            for name, load in loads.items():
                lm = load()
                s = self.settings
                scheduler = Scheduler(lm, max_batch=s.max_batch, max_queue=s.max_queue, metrics=self.metrics)
                spans = self._spans(lm)
                scheduler.start()
                scheduler.ready.wait()
                self.models[name] = Served(name, lm, scheduler, spans=spans)
                logging.getLogger("uvicorn.error").info(
                    "nexttok: serving %r (%s; context %s, vocabulary %s); %s", name, lm.source.location,
                    lm.context_length, f"{lm.vocab_size:,}", scheduler.decoder.reason,
                )  # fmt: skip
        except Exception as e:  # reported by /health and every request
            self.failed = f"{type(e).__name__}: {e}"

    def _spans(self, lm: LM) -> Callable[[list[int]], dict] | None:
        if self.settings.corpus is None:
            return None
        from nexttok.corpus import CorpusIndex
        from nexttok.corpus.report import spans_report

        index = CorpusIndex.open(self.settings.corpus, lm)
        return lambda ids: spans_report(lm, index, ids, self.settings.min_span)

    def served(self, name: str | None = None) -> Served:
        """The model a request names (``None``: the first); 503 while loading, 404 for a name not served."""
        if len(self.models) < len(self.names):
            why = f"the model failed to load ({self.failed})" if self.failed else "the model is still loading"
            raise Problem(503, f"{why}; retry shortly", "service_unavailable", headers={"Retry-After": "2"})
        if name is None:
            return self.models[self.names[0]]
        if name not in self.models:
            served = ", ".join(repr(n) for n in self.names)
            raise Problem(404, f"the model {name!r} does not exist here; this server serves {served}",
                          "invalid_request_error", param="model", code="model_not_found")  # fmt: skip
        return self.models[name]

    @property
    def limits(self) -> tr.Limits:
        return tr.Limits(self.settings.max_logprobs, self.settings.max_n)


def create_app(load: Callable[[], LM] | dict[str, Callable[[], LM]], settings: ServeSettings | None = None) -> FastAPI:
    """The server's app. ``load`` returns the LM, called once in the background at startup; or a dict of such
    loaders by served name, for several models (the first is the default; ``/v1/compare`` compares two)."""
    settings = settings or ServeSettings()
    loads = load if isinstance(load, dict) else {settings.served_model_name: load}
    state = State(loads, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state._thread.start()
        yield
        for served in list(state.models.values()):
            await asyncio.to_thread(served.scheduler.close)

    app = FastAPI(title="nexttok", lifespan=lifespan)
    app.state.nexttok = state
    _errors(app)
    app.add_middleware(BodyLimit, limit=settings.max_body)
    app.add_middleware(CountRequests, metrics=state.metrics)
    auth = _auth(settings)
    _routes(app, state, auth)
    return app


def _routes(app: FastAPI, state: State, auth) -> None:
    secured = [Depends(auth)]

    web = files("nexttok").joinpath("web")
    app.mount("/web", StaticFiles(directory=str(web)), name="web")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(web.joinpath("index.html")))

    @app.get("/health")
    def health():
        state.served()
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics():
        return Response(state.metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=secured)
    def models() -> ModelList:
        state.served()
        return ModelList(data=[_card(state, m) for m in state.models.values()])

    @app.post("/v1/completions", dependencies=secured)
    async def completions(req: CompletionRequest, request: Request):
        m = state.served(req.model)
        plan = cm.plan_completion(m.lm, req, state.limits)
        return await _answer(state, m, plan, req, request, None)

    @app.post("/v1/chat/completions", dependencies=secured)
    async def chat(req: ChatRequest, request: Request):
        m = state.served(req.model)
        plan = cm.plan_chat(m.lm, req, state.limits)
        return await _answer(state, m, plan, req, request, req.logprobs)

    @app.post("/v1/next_token", dependencies=secured)
    async def next_token(req: NextTokenRequest):
        m = state.served(req.model)
        return await _on(m, lambda: _next_token(m.lm, req))

    @app.post("/v1/stages", dependencies=secured)
    async def stages(req: StagesRequest):
        m = state.served(req.model)
        return await _on(m, lambda: explore.stages(m.lm, m.scores, req))

    @app.post("/v1/ranks", dependencies=secured)
    async def ranks(req: RanksRequest):
        m = state.served(req.model)
        return await _on(m, lambda: explore.ranks(m.lm, m.scheduler, req))

    @app.post("/v1/compare", dependencies=secured)
    async def compare(req: CompareRequest):
        a, b = (state.served(n) for n in explore.compared(state.names, req))
        ids = explore.same_ids(a.lm, b.lm, req)
        dist_a, dist_b = [await _on(m, lambda m=m: m.lm.distribution(ids)) for m in (a, b)]
        return explore.comparison(a.name, b.name, dist_a, dist_b, req)

    @app.post("/tokenize", dependencies=secured)
    def tokenize(req: TokenizeRequest):
        return _tokenize(state.served(req.model).lm, req)

    @app.post("/detokenize", dependencies=secured)
    def detokenize(req: DetokenizeRequest):
        lm = state.served(req.model).lm
        tr.prompt_ids(lm, req.tokens) if req.tokens else None
        pieces = [{"id": i, "text": lm.token_text(i), "bytes": list(lm.token_bytes(i))} for i in req.tokens]
        return {"text": lm.tokenizer.decode(req.tokens), "tokens": pieces}


async def _on(m: Served, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the model's own thread, awaited."""
    return await asyncio.wrap_future(m.scheduler.call(fn))


async def _answer(state: State, m: Served, plan: cm.Plan, req, request: Request, chat_logprobs):
    lm, scheduler, model, decoder = m.lm, m.scheduler, m.name, m.scheduler.decoder.reason
    state.metrics.tokens_in.inc(sum(len(j.ids) for j in plan.jobs))
    flight = cm.Flight(scheduler, plan)
    try:
        flight.submit()
    except cm.TooBusy as e:
        retry = str(state.settings.retry_after)
        raise Problem(429, f"the server is busy: {e}; retry after {retry} s", "rate_limit_exceeded",
                      code="server_busy", headers={"Retry-After": retry}) from None  # fmt: skip
    if req.stream:
        include = bool(req.stream_options and req.stream_options.include_usage)
        body = cm.stream(lm, flight, model, include, chat_logprobs, m.spans)
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    task = asyncio.ensure_future(cm.collect(flight))
    while not task.done():  # a client that goes away before its answer frees its rows
        await asyncio.wait([task], timeout=0.25)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return Response(status_code=499)
    choices = task.result()
    if chat_logprobs is None:
        body = cm.completion_body(lm, plan, choices, model, decoder).model_dump()
    else:
        body = cm.chat_body(lm, plan, choices, model, decoder, chat_logprobs).model_dump()
    return cm.with_spans(body, choices, m.spans)


def _card(state: State, m: Served) -> ModelCard:
    lm = m.lm
    return ModelCard(
        id=m.name, created=state.created, context_length=lm.context_length,
        vocab_size=lm.vocab_size, source=lm.source.location if lm.source.kind != "default" else "default",
    )  # fmt: skip


def _next_token(lm: LM, req: NextTokenRequest) -> dict[str, Any]:
    """``nexttok predict --json`` for the request (on the model's thread)."""
    for t in req.temperatures:
        if not t > 0:
            raise NexttokError(f"temperatures must be > 0 (got {t})", param="temperatures")
    ids = tr.request_ids(lm, req)
    chat = req.messages is not None
    text = req.prompt if req.prompt is not None else lm.tokenizer.decode(ids)
    base = Distribution(lm.last_logits(ids), lm, ids)
    dists = [base.with_temperature(t) for t in req.temperatures or [1.0]]
    return predict_report(lm, text, chat, dists, req.top, list(req.tokens))


def _tokenize(lm: LM, req: TokenizeRequest) -> dict[str, Any]:
    ids = tr.request_ids(lm, req, req.add_generation_prompt)
    text = req.prompt if req.messages is None else lm.tokenizer.decode(ids)
    starts = tr.offsets(lm, ids)
    ends = [*starts[1:], len(lm.tokenizer.decode(ids))]
    rows = [
        {"index": i, "id": t, "text": lm.token_text(t), "bytes": list(lm.token_bytes(t)), "start": a, "end": b}
        for i, (t, a, b) in enumerate(zip(ids, starts, ends, strict=True))
    ]
    return {"tokens": rows, "count": len(ids), "max_model_len": lm.context_length, "text": text}


# --- errors, auth, limits, counting ---------------------------------------------------------------------------


def _errors(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def problem(request: Request, e: Problem):
        body = cm.error_body(str(e), e.param, e.kind, e.code)
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(NexttokError)
    async def bad_input(request: Request, e: NexttokError):
        return JSONResponse(cm.error_body(str(e), e.param), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = _first_problem(e.errors())
        return JSONResponse(cm.error_body(message, param), status_code=400)

    @app.exception_handler(HTTPException)
    async def http(request: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(cm.error_body(str(e.detail), None, kind), status_code=e.status_code, headers=e.headers)


def _first_problem(errors: list[dict]) -> tuple[str, str | None]:
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    # A union's alternatives add their type names to the location: keep the field path only.
    path = ".".join(p for p in loc if not any(c in p for c in "[]()") and not p.startswith("function-"))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return (
            f"the body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')}); send a JSON object",
            None,
        )
    if kind == "extra_forbidden":
        return f"unknown field '{path}'; nexttok's own fields go under 'nexttok' (see docs/serve.md)", path
    if kind == "missing":
        return f"'{path}' is required", path
    return f"'{path}': {err.get('msg', 'invalid value')} (got {err.get('input')!r})", path or None


def _auth(settings: ServeSettings):
    async def check(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {settings.api_key}":
            raise Problem(401, "a valid API key is needed: send 'Authorization: Bearer <key>' (the server's --api-key)",
                          "invalid_request_error", code="invalid_api_key")  # fmt: skip

    return check


class BodyLimit:
    """413 for a body over ``limit`` bytes, whether it says its length up front or not (pure ASGI)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = cm.error_body(f"the body is over the server's limit of {self.limit} bytes (--max-body)", None)
        await JSONResponse(body, status_code=413)({"type": "http"}, None, send)


class _TooLarge(Exception):
    pass


class CountRequests:
    """Counts each HTTP request by its route and status (pure ASGI: streams and disconnects pass untouched)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status[0])).inc()
