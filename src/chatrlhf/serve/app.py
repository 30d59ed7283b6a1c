"""`chatrlhf serve`: an OpenAI-compatible chat-completions API and a web chat page over any checkpoint.

    chatrlhf serve runs/x/ppo --port 8000        # then point any OpenAI client at http://127.0.0.1:8000/v1

Routes: GET /health, GET /v1/models, POST /v1/chat/completions (stream via server-sent events ending in
`data: [DONE]`), and the chat page at /. Prompts go through the same conversation renderer as training.
Errors use OpenAI's error body with the matching status; the server stays up. A request whose generation
fails gets a 500 (`server_error`) when nothing was sent yet; a stream that already started ends with an
OpenAI-style error event, `data: {"error": {...}}`, instead of `[DONE]`. Both are logged.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError, field_validator

from chatrlhf.chat_template import prompt_ids
from chatrlhf.configs import SamplingConfig, ServeConfig
from chatrlhf.serve.engine import Engine
from chatrlhf.serve.engine import Request as EngineRequest

PAGE = Path(__file__).with_name("page.html")


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def encodable(cls, content: str) -> str:
        # JSON may carry a lone UTF-16 surrogate ("\ud800"), which no tokenizer can encode
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"not valid Unicode text (a lone surrogate at character {e.start})") from None
        return content


class ChatRequest(BaseModel):
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what a torch generator takes
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def ends_with_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError("the last message must come from the user")
        if any(m.role == "system" for m in messages[1:]):
            raise ValueError("a system message may only come first")
        return messages

    @field_validator("stop")
    @classmethod
    def at_most_four(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(cfg: ServeConfig, model, tokenizer, name: str) -> FastAPI:
    app = FastAPI(title="chatrlhf", version="0.1.0")
    engine = Engine(model, tokenizer, cfg.max_batch)
    _install_error_handlers(app)

    def check_key(request: Request) -> None:
        if cfg.api_key and request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
            raise APIError(
                401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key"
            )

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8").replace("{{MODEL}}", name)

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "chatrlhf"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req, ids, sampling, stops = await _read_request(request, cfg, tokenizer, name)
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def put(*event) -> None:  # called from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        engine_request = EngineRequest(
            ids,
            sampling,
            req.n,
            stops,
            req.seed,
            on_text=lambda c, d: put("text", c, d),
            on_done=lambda c, r, t: put("done", c, (r, t)),
            on_error=lambda e: put("error", None, e),
        )
        engine.submit(engine_request)
        if req.stream:
            # the status line goes out with the first event, so a request that fails before producing
            # anything still gets a 500 instead of a stream
            first = await _next_event(events, engine_request)
            if first[0] == "error":
                raise APIError(500, _failure(first[2]))
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                _stream(
                    events, first, engine_request, ids, req.n, completion_id, created, name, include_usage
                ),
                media_type="text/event-stream",
            )
        texts, reasons, counts = await _collect(events, engine_request, req.n)
        return _completion(completion_id, created, name, texts, reasons, len(ids), counts)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every failure answers in OpenAI's error format: the API's own errors with their status, a malformed
    request with 400 naming the field, and anything unexpected with 500."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(e.status, "invalid_request_error")
        kind = "server_error" if e.status >= 500 else kind
        return JSONResponse(error_body(e.message, kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = first["msg"] if param is None else f"{param}: {first['msg']}"
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        # a bug of the server's own: still OpenAI's error body (uvicorn logs the traceback)
        message = f"the server failed on this request ({type(e).__name__}); it logged the details"
        return JSONResponse(error_body(message, "server_error"), status_code=500)


async def _read_request(
    request: Request, cfg: ServeConfig, tokenizer, name: str
) -> tuple[ChatRequest, list[int], SamplingConfig, list[str]]:
    """The validated request, its prompt's token ids, its sampling settings and stop strings; an
    `APIError` (4xx) naming what is wrong otherwise."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    try:
        req = ChatRequest.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if req.model != name:
        raise APIError(
            404,
            f"model {req.model!r} does not exist; this server serves {name!r}",
            "model",
            "model_not_found",
        )
    max_new = req.max_completion_tokens or req.max_tokens or min(256, cfg.max_tokens)
    if max_new > cfg.max_tokens:
        raise APIError(400, f"max_tokens: at most {cfg.max_tokens} on this server", "max_tokens")
    ids = prompt_ids(tokenizer, [m.model_dump() for m in req.messages], cfg.system_prompt)
    if len(ids) > cfg.max_prompt_tokens:
        raise APIError(
            400,
            f"the conversation is {len(ids)} tokens, more than this server's {cfg.max_prompt_tokens}",
            "messages",
            "context_length_exceeded",
        )
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    sampling = SamplingConfig(max_new_tokens=max_new, temperature=req.temperature, top_p=req.top_p)
    return req, ids, sampling, stops


async def _collect(
    events: asyncio.Queue, engine_request: EngineRequest, n: int
) -> tuple[list[str], list[str], list[int]]:
    """Every choice's text, finish reason and token count, once all `n` are done."""
    texts, reasons, counts = [""] * n, [""] * n, [0] * n
    finished = 0
    while finished < n:
        kind, choice, payload = await _next_event(events, engine_request)
        if kind == "error":
            raise APIError(500, _failure(payload))
        if kind == "text":
            texts[choice] += payload
        else:
            reasons[choice], counts[choice] = payload
            finished += 1
    return texts, reasons, counts


def _completion(completion_id, created, name, texts, reasons, prompt_tokens: int, counts) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": reason,
                "logprobs": None,
            }
            for i, (text, reason) in enumerate(zip(texts, reasons))
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": sum(counts),
            "total_tokens": prompt_tokens + sum(counts),
        },
    }


async def _next_event(events: asyncio.Queue, engine_request: EngineRequest) -> tuple:
    try:
        return await events.get()
    except asyncio.CancelledError:
        engine_request.cancelled.set()  # the client went away: free its rows
        raise


def _failure(error: Exception) -> str:
    return f"generation failed ({type(error).__name__}: {error}); the server logged the details"


async def _stream(
    events: asyncio.Queue, first: tuple, engine_request, ids, n, completion_id, created, name, include_usage
):
    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": choices,
        }
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk(
            [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for i in range(n)
            ]
        )
        finished, completion_tokens, event = 0, 0, first
        while True:
            kind, choice, payload = event
            if kind == "error":
                # the 200 status is already sent: end the stream with an error event, as OpenAI does
                yield f"data: {json.dumps(error_body(_failure(payload), 'server_error'))}\n\n"
                return
            if kind == "text":
                yield chunk([{"index": choice, "delta": {"content": payload}, "finish_reason": None}])
            else:
                reason, tokens = payload
                finished += 1
                completion_tokens += tokens
                yield chunk([{"index": choice, "delta": {}, "finish_reason": reason}])
            if finished == n:
                break
            event = await events.get()
        if include_usage:
            usage = {
                "prompt_tokens": len(ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(ids) + completion_tokens,
            }
            yield chunk([], usage)
        yield "data: [DONE]\n\n"
    finally:
        engine_request.cancelled.set()  # a client that went away frees its rows


def run(cfg: ServeConfig) -> None:
    import logging

    import uvicorn

    from chatrlhf.models import load_causal_lm, load_tokenizer, pick_device, resolve_model

    path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, tokenizer, pick_device())
    name = cfg.served_name or Path(path).name or path
    app = create_app(cfg, model, tokenizer, name)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    print(
        f"serving {path} as {name!r} on http://{cfg.host}:{cfg.port}  (chat page at /, API at /v1)",
        flush=True,
    )
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
