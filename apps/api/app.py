"""The FastAPI application: /v1/models, /v1/chat/completions, /v1/completions (with server-sent events).

Every failure leaves as OpenAI's error body with a 4xx (the request's fault) or 5xx (the swarm's).
Every answer says how much of it spot checks verified: `verification` in a whole response, and in the final
chunk of a streamed one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from apps.api import schema
from apps.api.backend import GenerationParams, GenerationResult, RequestTooLong, SwarmBackend
from swarm.errors import SwarmError

logger = logging.getLogger(__name__)

Chunk = Callable[..., dict]  # (text, finish_reason, verification=None) -> one streamed event body


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.detail = status, schema.ErrorDetail(message=message, type=type_, param=param, code=code)


def error_response(status: int, detail: schema.ErrorDetail) -> JSONResponse:
    return JSONResponse(schema.ErrorBody(error=detail).model_dump(), status_code=status)


def _validation_detail(exc: RequestValidationError) -> schema.ErrorDetail:
    first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = f"{where}: {first['msg']}" if where else f"invalid request body: {first['msg']}"
    return schema.ErrorDetail(message=message, type="invalid_request_error", param=where or None,
                              code=str(first.get("type", "invalid_value")))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_detail(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, schema.ErrorDetail(message=str(exc.detail), type=kind))


def _params(request: schema.ChatCompletionRequest | schema.CompletionRequest) -> GenerationParams:
    return GenerationParams(request.token_limit(), request.temperature, request.top_p, request.stop_sequences())


def _sse(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


def _usage(result: GenerationResult) -> schema.Usage:
    return schema.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        total_tokens=result.prompt_tokens + result.completion_tokens)


def checked_prompt(backend: SwarmBackend, ids: list[int], params: GenerationParams) -> list[int]:
    try:
        backend.budget(ids, params.max_new_tokens)
    except RequestTooLong as e:
        raise APIError(400, str(e), "invalid_request_error", "max_tokens", "context_length_exceeded") from None
    return ids


async def generate(backend: SwarmBackend, ids: list[int], params: GenerationParams) -> GenerationResult:
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(backend.executor, backend.generate, ids, params)
    except SwarmError as e:
        logger.warning(f"generation failed: {e}")
        raise APIError(503, f"the swarm could not serve this request: {e}", "server_error") from None


async def stream_events(backend: SwarmBackend, ids: list[int], params: GenerationParams,
                        chunk: Chunk) -> AsyncIterator[bytes]:
    """SSE events: chunk(text, None) for each piece of text, then chunk(None, finish_reason, verification),
    then [DONE]."""
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[str] = asyncio.Queue()
    cancelled = threading.Event()
    job = loop.run_in_executor(backend.executor, backend.generate, ids, params,
                               lambda text: loop.call_soon_threadsafe(pieces.put_nowait, text), cancelled)
    try:
        while True:
            waiter = asyncio.ensure_future(pieces.get())
            done, _ = await asyncio.wait({waiter, job}, return_when=asyncio.FIRST_COMPLETED)
            if waiter in done:
                yield _sse(chunk(waiter.result(), None))
                continue
            waiter.cancel()
            while not pieces.empty():
                yield _sse(chunk(pieces.get_nowait(), None))
            break
        try:
            result = job.result()
        except SwarmError as e:
            logger.warning(f"streamed generation failed: {e}")
            detail = schema.ErrorDetail(message=f"the swarm could not serve this request: {e}", type="server_error")
            yield _sse(schema.ErrorBody(error=detail).model_dump())
            return
        yield _sse(chunk(None, result.finish_reason, result.verification))
        yield _sse("[DONE]")
    finally:
        cancelled.set()  # the client went away, or we are done: stop generating


def _dump(body: schema.Response) -> dict:
    """A body as JSON, without `verification` where there is none (every chunk but the last)."""
    return body.model_dump(exclude={"verification"} if getattr(body, "verification", None) is None else set())


def chat_chunk(reply_id: str, model: str) -> Chunk:
    def chunk(text: str | None, finish: str | None, verification: schema.Verification | None = None) -> dict:
        delta = schema.Delta(role="assistant", content=text) if text is not None else schema.Delta()
        choice = schema.ChatChunkChoice(delta=delta, finish_reason=finish)
        return _dump(schema.ChatCompletionChunk(id=reply_id, model=model, choices=[choice], verification=verification))

    return chunk


def completion_chunk(reply_id: str, model: str) -> Chunk:
    def chunk(text: str | None, finish: str | None, verification: schema.Verification | None = None) -> dict:
        choice = schema.CompletionChoice(text=text or "", finish_reason=finish)
        return _dump(schema.Completion(id=reply_id, model=model, choices=[choice], verification=verification))

    return chunk


def create_app(backend: SwarmBackend, model_names: tuple[str, ...]) -> FastAPI:
    """`model_names[0]` is the name listed by /v1/models; requests may use any of them."""
    app = FastAPI(title="eFedLLM swarm, OpenAI-compatible API")
    install_error_handlers(app)
    created = int(time.time())

    def check_model(name: str) -> None:
        if name not in model_names:
            raise APIError(404, f"the model {name!r} does not exist; this server has {model_names[0]!r}",
                           "not_found_error", "model", "model_not_found")

    @app.get("/v1/models")
    async def list_models() -> schema.ModelList:
        return schema.ModelList(data=[schema.ModelCard(id=model_names[0], created=created)])

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: schema.ChatCompletionRequest):
        check_model(request.model)
        params = _params(request)
        messages = [{"role": m.template_role(), "content": m.text()} for m in request.messages]
        ids = checked_prompt(backend, backend.chat_prompt(messages), params)
        reply_id = schema.new_id("chatcmpl")
        if request.stream:
            events = stream_events(backend, ids, params, chat_chunk(reply_id, request.model))
            return StreamingResponse(events, media_type="text/event-stream")
        result = await generate(backend, ids, params)
        message = schema.AssistantMessage(content=result.text)
        return schema.ChatCompletion(id=reply_id, model=request.model, usage=_usage(result),
                                     choices=[schema.ChatChoice(message=message, finish_reason=result.finish_reason)],
                                     verification=result.verification)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: schema.CompletionRequest):
        check_model(request.model)
        params = _params(request)
        ids = checked_prompt(backend, backend.text_prompt(request.prompt_text()), params)
        reply_id = schema.new_id("cmpl")
        if request.stream:
            events = stream_events(backend, ids, params, completion_chunk(reply_id, request.model))
            return StreamingResponse(events, media_type="text/event-stream")
        result = await generate(backend, ids, params)
        choice = schema.CompletionChoice(text=result.text, finish_reason=result.finish_reason)
        return schema.Completion(id=reply_id, model=request.model, choices=[choice], usage=_usage(result),
                                 verification=result.verification)

    return app
