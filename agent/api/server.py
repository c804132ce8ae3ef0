"""The HTTP API: OpenAI-compatible chat on the learning model, and seal's own resources.

- ``GET /v1/models``: ``seal`` (the active adapter), ``seal:base`` and every committed
  knowledge version still on disk (``seal:knowledge-0012``);
- ``POST /v1/chat/completions``: OpenAI's chat completions, streamed (server-sent
  events) or not, answered by the model desk (``agent.api.desk``) one at a time;
- ``POST /v1/documents``: a document to learn (the body; ``?name=notes.md`` says its
  kind, ``&title=``), read and checked exactly as ``seal ingest FILE`` reads it;
- ``GET /v1/status``, ``/v1/queue``, ``/v1/adapters``, ``/v1/forgetting``: the data of
  ``seal daemon status --json``, ``seal queue --json``, ``seal history --json`` and
  ``seal forgetting --json``, paged (``limit``, ``offset``; ``versions``, ``passages``).

Every request needs ``Authorization: Bearer <token>`` (``<home>/token``). Errors are
JSON in OpenAI's shape, ``{"error": {"message", "type", "code"}}``, with a 4xx/5xx
status; a refused request changes nothing in the store.

Built on Starlette (an ASGI toolkit with no more than it needs; FastAPI is Starlette
plus validation and docs that this handful of routes does not need), served by
uvicorn in a thread of the daemon (``agent.api.service``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters.names import KNOWLEDGE, SAVED
from store import Store

from ..home import Home
from ..ingest import IngestConfig
from .config import ApiConfig
from .desk import ACTIVE, BASE, PREFIX, Busy, ChatJob, Desk, UnknownModel

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 **extra):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.extra = status, message, kind, code, extra


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
          **extra) -> JSONResponse:
    """OpenAI's error shape; ``extra`` fields go beside ``error`` (a 409's documents)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}, **extra},
                        status_code=status)


@dataclass
class Context:
    """What the routes need: the home (its store, opened per request), the settings,
    the model desk, how to format a conversation and how to read an uploaded document."""

    home: Home
    cfg: ApiConfig
    ingest: IngestConfig
    token: str
    desk: Desk
    conversation: Callable[[list[dict]], str]  # messages -> the formatted prompt (the model's chat template)
    tokenizer: Callable[[], object]  # the tokenizer that counts a passage's tokens (loaded once)
    started_at: float = 0.0


# ---------------------------------------------------------------------------- helpers
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (read no further than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is {int(declared):,} bytes, over the limit api.max_body_bytes = {limit:,}",
                       code="body_too_large")
    got = bytearray()
    async for chunk in request.stream():
        got += chunk
        if len(got) > limit:
            raise ApiError(413, f"the body is over the limit api.max_body_bytes = {limit:,}", code="body_too_large")
    return bytes(got)


async def read_json(request: Request, limit: int) -> dict:
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def int_param(request: Request, name: str, default: int, lo: int = 0, hi: int = 10_000) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise ApiError(400, f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _text(content: object, where: str) -> str:
    """A message's content: a string, or OpenAI's list of parts of which only text is read."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if len(parts) == len(content) and all(isinstance(t, str) for t in parts):
            return "".join(parts)
        raise ApiError(400, f"{where}: only text content is supported")
    raise ApiError(400, f"{where}: content must be a string or a list of text parts")


def chat_request(body: dict, cfg: ApiConfig) -> dict:
    """The fields of a chat completion request that seal uses, checked."""
    model = body.get("model", ACTIVE) or ACTIVE
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}]: role must be system, user or assistant")
        role = "system" if m["role"] == "developer" else m["role"]
        turns.append({"role": role, "content": _text(m.get("content"), f"messages[{i}]")})
    if turns[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "n must be 1: seal answers once per request")
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is None:
        tokens = cfg.default_tokens
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer")
    temperature = body.get("temperature", 0.0)
    top_p = body.get("top_p", 1.0)
    seed = body.get("seed", 0)
    for name, v, lo, hi in (("temperature", temperature, 0, 2), ("top_p", top_p, 0, 1)):
        if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
            raise ApiError(400, f"{name} must be a number between {lo} and {hi}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ApiError(400, "seed must be an integer")
    return {"model": model, "messages": turns, "max_tokens": min(tokens, cfg.max_tokens),
            "temperature": float(temperature), "top_p": float(top_p) if top_p > 0 else 1.0, "seed": seed,
            "stream": bool(body.get("stream", False))}


def _store_read(ctx: Context, fn: Callable[[Store], object], empty: object) -> object:
    if not ctx.home.store_file.exists():
        return empty
    with Store(ctx.home.store_file) as store:
        return fn(store)


# ---------------------------------------------------------------------------- routes
async def models(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    limit = int_param(request, "limit", 100, 0, 10_000)

    def versions(store: Store) -> list[dict]:
        return [r for r in store.adapter_history(KNOWLEDGE, limit or -1, 0) if r["status"] != "pruned"]

    rows = await run_in_threadpool(_store_read, ctx, versions, [])
    created = int(ctx.started_at)
    data = [{"id": ACTIVE, "object": "model", "created": created, "owned_by": "seal",
             "description": "the active knowledge adapter: what seal has learned"},
            {"id": BASE, "object": "model", "created": created, "owned_by": "seal",
             "description": "the base model, without what seal learned"}]
    data += [{"id": PREFIX + r["id"], "object": "model", "created": int(r["created_at"] or 0), "owned_by": "seal",
              "description": f"{r['kind']} version{' (active)' if r.get('active') else ''}"
                             f"{': ' + r['title'] if r.get('title') else ''}"} for r in rows]
    return JSONResponse({"object": "list", "data": data})


async def chat_completions(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    req = chat_request(await read_json(request, ctx.cfg.max_body_bytes), ctx.cfg)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str | None] = asyncio.Queue()
    try:
        job = ChatJob(prompt=ctx.conversation(req["messages"]), model=req["model"], max_tokens=req["max_tokens"],
                      temperature=req["temperature"], top_p=req["top_p"], seed=req["seed"],
                      on_text=lambda t: loop.call_soon_threadsafe(pieces.put_nowait, t),
                      on_done=lambda: loop.call_soon_threadsafe(pieces.put_nowait, None))
        ctx.desk.submit(job)
    except Busy as e:
        raise ApiError(503, str(e), "server_busy", "busy") from None
    except UnknownModel as e:
        raise ApiError(404, str(e), code="model_not_found") from None
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    async def next_piece() -> str | None:
        """The next piece of text, None at the end; 503 if the model stayed busy too long."""
        timeout = None if job.started.is_set() else ctx.cfg.wait_s
        try:
            return await asyncio.wait_for(pieces.get(), timeout)
        except TimeoutError:
            if job.started.is_set():
                return await pieces.get()
            job.cancelled.set()
            raise ApiError(503, f"the model stayed busy for {ctx.cfg.wait_s:g} s (learning): try again later",
                           "server_busy", "busy") from None

    def failure() -> ApiError | None:
        e = job.error
        if e is None:
            return None
        if isinstance(e, UnknownModel):
            return ApiError(404, str(e), code="model_not_found")
        return ApiError(500, f"generation failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}", "server_error")

    def chunk(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                      "model": req["model"], "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish}]}) + "\n\n"

    if not req["stream"]:
        try:
            while await next_piece() is not None:
                pass
        finally:
            if not job.done.is_set():  # the client went away: stop generating for it
                job.cancelled.set()
        if (e := failure()) is not None:
            raise e
        usage = {"prompt_tokens": job.n_prompt, "completion_tokens": job.n_tokens,
                 "total_tokens": job.n_prompt + job.n_tokens}
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": req["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": job.text},
                                          "finish_reason": job.finish}], "usage": usage})

    # streamed: the first piece (or the failure) is awaited before the 200 goes out
    first = await next_piece()
    if first is None and (e := failure()) is not None:
        raise e

    async def events() -> AsyncIterator[str]:
        try:
            yield chunk({"role": "assistant", "content": ""})
            piece = first
            while piece is not None:
                yield chunk({"content": piece})
                piece = await pieces.get()
            if (e := failure()) is not None:
                yield "data: " + json.dumps({"error": {"message": e.message, "type": e.kind, "code": e.code}}) + "\n\n"
            else:
                yield chunk({}, job.finish)
            yield "data: [DONE]\n\n"
        finally:
            job.cancelled.set()  # a client that went away stops the generation

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


BATCH = "application/vnd.seal.ingest+json"  # several documents and a questions file: one `seal ingest`


async def documents(request: Request) -> Response:
    """Documents to learn, with the checks and parsing of `seal ingest`. The body is one
    document (its kind from ``?name=`` or the Content-Type; ``&title=``), or, as
    ``application/vnd.seal.ingest+json``, a whole `seal ingest` call: ``{"documents":
    [{"name", "content"}], "questions": {"name", "content"} | null, "title": str | null}``.
    One transaction: every document is stored, or none."""
    from ..ingest import IngestError, outcome_rows, prepare_sources

    ctx: Context = request.app.state.ctx
    data = await read_body(request, ctx.cfg.max_body_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    title, questions = request.query_params.get("title"), None
    if kind == BATCH:
        try:
            body = json.loads(data)
            sources = [(d["name"], _content(d)) for d in body["documents"]]
            questions = (body["questions"]["name"], _content(body["questions"])) if body.get("questions") else None
            title = body.get("title")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ApiError(400, 'a batch is {"documents": [{"name", "content"}], "questions": '
                                '{"name", "content"} | null, "title": str | null}') from None
    else:
        sources = [(request.query_params.get("name") or _name_for(kind), data)]

    def ingest() -> dict:
        try:
            docs = prepare_sources(sources, cfg=ctx.ingest, tokenizer=ctx.tokenizer(), title=title, questions=questions)
        except IngestError as e:
            raise ApiError(400, str(e), code="bad_document") from None
        ctx.home.ensure()
        with Store(ctx.home.store_file) as store:
            outcomes = store.ingest(docs)
        rows = outcome_rows(docs, outcomes)
        if not any(r["status"] == "new" for r in rows):
            raise ApiError(409, f"nothing new to ingest: {len(rows)} duplicate document(s)", code="duplicate",
                           documents=rows)
        out = {"documents": rows, "passages": sum(r["passages"] for r in rows),
               "questions": sum(r["questions"] for r in rows)}
        log.info("API: ingested %s: %d passage(s), %d question(s)", ", ".join(r["source"] for r in rows),
                 out["passages"], out["questions"])
        return out

    return JSONResponse(await run_in_threadpool(ingest), status_code=201)


def _content(item: dict) -> bytes:
    """A batch item's text, as the bytes a file of it would hold."""
    if not isinstance(item["content"], str):
        raise TypeError("content")
    return item["content"].encode("utf-8", "surrogatepass")


def _name_for(content_type: str) -> str:
    kind = content_type.split(";")[0].strip().lower()
    return {"application/json": "upload.json", "application/x-ndjson": "upload.jsonl", "application/jsonl": "upload.jsonl",
            "text/markdown": "upload.md"}.get(kind, "upload.txt")


async def status(request: Request) -> Response:
    from ..daemon.process import daemon_status

    ctx: Context = request.app.state.ctx
    out = await run_in_threadpool(daemon_status, ctx.home, None, request.query_params.get("disk") in ("1", "true"))
    out["api"] = {"waiting": ctx.desk.waiting, "queue": ctx.cfg.queue, "max_tokens": ctx.cfg.max_tokens}
    return JSONResponse(out)


async def jobs(request: Request) -> Response:
    from store.db import JOB_STATES

    ctx: Context = request.app.state.ctx
    limit = int_param(request, "limit", 50, 1, 10_000)
    offset = int_param(request, "offset", 0, 0, 10**9)
    states = request.query_params.get("state")
    states = tuple(states.split(",")) if states else ("pending", "claimed", "failed")
    if bad := [s for s in states if s not in JOB_STATES]:
        raise ApiError(400, f"state {bad[0]!r}: one of {', '.join(JOB_STATES)}")

    def read(store: Store) -> dict:
        rows = store.jobs(states, limit=limit + offset)[offset:]
        counts = store.queue_summary()
        return {"counts": counts, "jobs": rows, "truncated": offset + len(rows) < sum(counts[s] for s in states),
                "limit": limit, "offset": offset}

    return JSONResponse(await run_in_threadpool(_store_read, ctx, read,
                                                {"counts": dict.fromkeys(JOB_STATES, 0), "jobs": [],
                                                 "truncated": False, "limit": limit, "offset": offset}))


async def adapters(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    limit = int_param(request, "limit", 50, 1, 10_000)
    offset = int_param(request, "offset", 0, 0, 10**9)
    name = request.query_params.get("name", KNOWLEDGE)
    if name not in SAVED:
        raise ApiError(400, f"name {name!r}: one of {', '.join(SAVED)}")

    def read(store: Store) -> dict:
        return {"versions": store.adapter_history(name, limit, offset), "total": store.count_adapters(name),
                "active": store.active_adapter_id(name), "limit": limit, "offset": offset}

    return JSONResponse(await run_in_threadpool(_store_read, ctx, read,
                                                {"versions": [], "total": 0, "active": None, "limit": limit,
                                                 "offset": offset}))


async def forgetting(request: Request) -> Response:
    from ..tracking import forgetting_summary

    ctx: Context = request.app.state.ctx
    versions = int_param(request, "versions", 50, 0, 1000)
    passages = int_param(request, "passages", 50, 0, 1000)
    return JSONResponse(await run_in_threadpool(_store_read, ctx, lambda s: forgetting_summary(s, versions, passages), {}))


# ---------------------------------------------------------------------------- the app
ROUTES = [
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/documents", documents, methods=["POST"]),
    Route("/v1/status", status, methods=["GET"]),
    Route("/v1/queue", jobs, methods=["GET"]),
    Route("/v1/adapters", adapters, methods=["GET"]),
    Route("/v1/forgetting", forgetting, methods=["GET"]),
]


class Auth:
    """ASGI middleware: every HTTP request needs the bearer token; errors are JSON."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.token):
            what = "a wrong token" if given else "no token"
            response = error(401, f"{what}: send 'Authorization: Bearer <token>' (the token is in <home>/token)",
                             "authentication_error", "invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(ctx: Context) -> Starlette:
    async def api_error(request: Request, exc: ApiError) -> Response:
        return error(exc.status, exc.message, exc.kind, exc.code, **exc.extra)

    async def http_error(request: Request, exc) -> Response:
        return error(exc.status_code, str(exc.detail), "invalid_request_error")

    from starlette.exceptions import HTTPException

    app = Starlette(routes=ROUTES, exception_handlers={ApiError: api_error, HTTPException: http_error})
    ctx.started_at = ctx.started_at or time.time()
    app.state.ctx = ctx
    app.add_middleware(Auth, token=ctx.token)
    return app
