"""The HTTP API as a FastAPI app over a backend that streams a call's items (no Ray in here):
Deltas, then one ReplyEnd (deployments/contract/replies.py).

Request path: validate (pydantic) -> resolve the model (deployments/frontend/served_models.py, the
one 404 for an unknown name) -> GenerateCall -> the shared request path
(deployments/frontend/service.py: limits, backend stream, one finish record) -> JSON or SSE frames.
Errors use OpenAI's error JSON: 400 invalid input, 404 unknown model, 413 prompt beyond the context
window, 503 overloaded, 500 only for our own bugs (a generic message and the request id; the details
only in the log, see http_errors.py). An error after streaming began arrives as an error event
followed by `data: [DONE]`. POST /v1/responses is a chat request too (responses.py builds it),
answered as a Response (responses_format.py) or as Responses events (responses_stream.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol, TypeVar

from fastapi import Depends, FastAPI, Header
from fastapi.responses import PlainTextResponse, StreamingResponse

from engine.prompt import Instruction
from engine.request import Delta, RequestEnd, new_request_id

from deployments.contract.errors import ApiError, ErrorResponse, internal_error, public
from deployments.contract.messages import GenerateCall, TokenizeCall, Tokenized
from deployments.contract.replies import Item, ReplyEnd
from deployments.contract.runtime_adapters import RuntimeAdapter, RuntimeAdapters
from deployments.frontend.guard import BodySizeLimit, RateLimiter, bearer_token, client_id, key_matches
from deployments.frontend.served_models import ServedModels, StoredNames
from deployments.frontend.service import Backend, Finished, RequestService
from deployments.http.choice_buffers import ChoiceBuffers
from deployments.http.http_errors import install_error_handling
from deployments.http.ignored_fields import log_ignored
from deployments.http.openai_format import (
    DONE_FRAME, ChatCompletion, ChatCompletionChunk, Completion, DetokenizeResponse, GenerateResponse, ModelCard,
    ModelList, ResponseMeta, TokenizeResponse, Usage, sse,
)
from deployments.http.openapi_doc import document_streams
from deployments.http.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateRequest, LoadLoraAdapterRequest,
    TokenizeChatRequest, TokenizeCompletionRequest, UnloadLoraAdapterRequest,
)
from deployments.http.responses import ResponsesRequest, new_response_id
from deployments.http.responses_format import ResponseEnvelope, ResponseObject
from deployments.http.responses_stream import ResponseEvents, ResponseStreamEvent, response_events
from deployments.http.tool_calls import tool_calls_of, with_tool_calls

__all__ = ["ApiBackend", "ApiSettings", "Backend", "Finished", "Item", "build_api"]

T = TypeVar("T")


class ApiBackend(Backend, Protocol):
    """The LLM deployment as the API sees it: generation streams and one-shot calls. A refusal
    is an ApiError returned in place of the answer."""

    def tokenize(self, call: TokenizeCall) -> Awaitable[Tokenized | ApiError]: ...

    def detokenize(self, tokens: list[int]) -> Awaitable[str | ApiError]: ...

    def load_adapter(self, adapter: RuntimeAdapter) -> Awaitable[ApiError | None]: ...


@dataclass
class ApiSettings:
    model_name: str
    model_aliases: tuple[str, ...]
    adapters: tuple[str, ...]
    on_finish: Callable[[Finished], None] = lambda finished: None
    api_keys: tuple[str, ...] = ()
    rate_limit_per_minute: int | None = None
    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    runtime_adapters: RuntimeAdapters | None = None  # None: loading adapters at run time is off
    stored_adapters: StoredNames | None = None  # None: no adapter stores


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in {
    400: "Invalid request", 401: "Missing or wrong API key", 404: "Unknown model",
    413: "Prompt beyond the context window, or body too large", 429: "Rate limit reached",
    500: "Server error", 503: "Overloaded: retry after Retry-After seconds",
}.items()}
GENERATION_RESPONSES = {  # the text/event-stream's events are declared by document_streams
    200: {"description": "JSON, or with `stream` true a text/event-stream of chunks (`data: {chunk}` "
          "frames, then `data: [DONE]`)"},
    **ERRORS,
}
RESPONSES_RESPONSES = {
    200: {"description": "A Response, or with `stream` true a text/event-stream of Responses events (`event:` and "
          "`data:` lines with a sequence_number; the last is response.completed, response.incomplete, "
          "response.failed or an error event; no `[DONE]`). Responses are not stored."},
    **ERRORS,
}
STREAM_CHUNKS = {"/v1/chat/completions": ChatCompletionChunk, "/v1/completions": Completion,
                 "/v1/responses": ResponseStreamEvent}

PLAIN_TEXT_RESPONSES = {  # vLLM's adapter routes answer plain text; their errors stay JSON
    200: {"description": "`Success: ...`", "content": {"text/plain": {"schema": {"type": "string"}}}},
    **ERRORS,
}


def build_api(backend: ApiBackend, settings: ApiSettings) -> FastAPI:
    """The FastAPI app: OpenAI routes, vLLM's /tokenize and /detokenize, /generate, /health."""
    app = FastAPI(title="lora-serve", description="OpenAI-compatible chat serving for a base model and LoRA adapters")
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    install_error_handling(app)
    service = ApiService(backend, settings)
    guarded = [Depends(service.authorize)]

    @app.post("/v1/chat/completions", dependencies=guarded, response_model=ChatCompletion,
              responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, tenant: str | None = Depends(service.tenant)):
        meta = ResponseMeta("chat", body.model, tool_calls=body.offered_tools())
        log_ignored(body, meta.id)
        call = await service.chat_call(body, meta, tenant)
        return await service.respond(call, meta, body.stream, _usage_wanted(body))

    @app.post("/v1/responses", dependencies=guarded, response_model=ResponseObject, responses=RESPONSES_RESPONSES)
    async def responses(body: ResponsesRequest, tenant: str | None = Depends(service.tenant)):
        """OpenAI's Responses API for text and function tools, run as the chat request it maps
        onto (deployments/http/responses.py). Responses are not stored: previous_response_id is a 400."""
        chat = body.chat_request()
        meta = ResponseMeta("chat", body.model, id=new_response_id(), tool_calls=chat.offered_tools())
        log_ignored(body, meta.id)
        call = await service.chat_call(chat, meta, tenant)
        envelope = ResponseEnvelope(meta.id, body.model, body.echo())
        if body.stream:
            return await service.stream_responses(call, meta, envelope)
        buffers, end = await service.complete(call, meta, "responses")
        return envelope.finished(buffers.outputs()[0], Usage.of(end.stats))

    @app.post("/v1/completions", dependencies=guarded, response_model=Completion, responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, tenant: str | None = Depends(service.tenant)):
        meta = ResponseMeta("completion", body.model)
        log_ignored(body, meta.id)
        call = GenerateCall(body.to_overrides(), prompt=body.prompt, request_id=meta.id, tenant=tenant,
                            **await service.call_fields(body.model))
        return await service.respond(call, meta, body.stream, _usage_wanted(body))

    @app.post("/generate", dependencies=guarded, response_model=GenerateResponse, responses=ERRORS)
    async def generate(body: GenerateRequest, tenant: str | None = Depends(service.tenant)) -> GenerateResponse:
        """The seed REST API: Alpaca instruction prompt in, {"output": text} out."""
        model = body.model or settings.model_name
        prompt = Instruction(body.prompt_config.instruction, body.prompt_config.input)
        meta = ResponseMeta("completion", model)
        call = GenerateCall(body.generation_config.to_overrides(), prompt=prompt, request_id=meta.id, tenant=tenant,
                            **await service.call_fields(model))
        buffers, _ = await service.complete(call, meta, "generate")
        return GenerateResponse(output=buffers.per_choice[0].text.strip())

    @app.get("/v1/models", dependencies=guarded, response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        return ModelList(data=await service.model_cards())

    @app.get("/v1/models/{model_id:path}", dependencies=guarded, response_model=ModelCard, responses=ERRORS)
    async def model(model_id: str) -> ModelCard:
        """One model's card (an alias answers with its base model's card); 404 for an unknown id."""
        return await service.model_card(model_id)

    @app.post("/tokenize", dependencies=guarded, response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeChatRequest | TokenizeCompletionRequest) -> TokenizeResponse:
        """vLLM's /tokenize: a chat's prompt ids as a chat request builds them, or a raw prompt's."""
        await service.models.resolve(body.model or settings.model_name)
        if isinstance(body, TokenizeChatRequest):
            call = TokenizeCall(messages=body.chat_messages(), add_generation_prompt=body.add_generation_prompt,
                                return_token_strs=body.return_token_strs)
        else:
            call = TokenizeCall(prompt=body.prompt, add_special_tokens=body.add_special_tokens,
                                return_token_strs=body.return_token_strs)
        result = await service.ask(backend.tokenize(call), "tokenize")
        return TokenizeResponse(count=len(result.tokens), max_model_len=result.max_model_len, tokens=result.tokens,
                                token_strs=result.token_strs)

    @app.post("/detokenize", dependencies=guarded, response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        """vLLM's /detokenize: the text of token ids (400 naming `tokens` for ids outside the vocabulary)."""
        await service.models.resolve(body.model or settings.model_name)
        return DetokenizeResponse(prompt=await service.ask(backend.detokenize(body.tokens), "detokenize"))

    @app.post("/v1/load_lora_adapter", dependencies=guarded, response_model=None, responses=PLAIN_TEXT_RESPONSES)
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> PlainTextResponse:
        """vLLM's runtime load: `lora_name` becomes a model on every replica (each loads it on
        first use; deployments/contract/runtime_adapters.py). 404 unless allow_runtime_adapters is on."""
        await service.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=guarded, response_model=None, responses=PLAIN_TEXT_RESPONSES)
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> PlainTextResponse:
        """vLLM's runtime unload: the name answers 404 from now on. 404 unless allow_runtime_adapters is on."""
        await service.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    document_streams(app, STREAM_CHUNKS)
    return app


class ApiService:
    """The work behind the routes: keys and rate limit, model names (`models`), runtime adapters,
    collection, SSE."""

    def __init__(self, backend: ApiBackend, settings: ApiSettings):
        self.settings, self.backend = settings, backend
        self.requests = RequestService(backend, settings.on_finish, settings.max_messages)
        self.limiter = RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        self.models = ServedModels(settings.model_name, settings.model_aliases, settings.adapters,
                                   settings.runtime_adapters, settings.stored_adapters)

    async def authorize(self, authorization: str | None = Header(None)) -> None:
        """401 without a valid key (when keys are set); 429 past the per-key rate limit."""
        key = bearer_token(authorization)
        if self.settings.api_keys and not key_matches(key, self.settings.api_keys):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        if self.limiter and (wait := self.limiter.retry_after(client_id(key))):
            raise ApiError(429, "Rate limit reached for this API key; retry later.", "rate_limit_error",
                           code="rate_limit_exceeded", retry_after=wait)

    async def tenant(self, authorization: str | None = Header(None)) -> str | None:
        """Who asks, for the engine's fair share: the key's `client_id` (a short hash, never the
        key itself: calls cross processes and are logged); None when the API has no keys."""
        return client_id(bearer_token(authorization)) if self.settings.api_keys else None

    async def chat_call(self, body: ChatCompletionRequest, meta: ResponseMeta, tenant: str | None) -> GenerateCall:
        """The call a chat request makes (chat completions and /v1/responses alike); 404 for an unknown model."""
        return GenerateCall(body.to_overrides(), messages=body.chat_messages(), tools=body.prompt_tools(),
                            request_id=meta.id, tenant=tenant, **await self.call_fields(body.model))

    async def call_fields(self, model: str) -> dict[str, str | None]:
        """A GenerateCall's `adapter` and `adapter_source` for `model`; 404 for an unknown model."""
        return (await self.models.resolve(model)).call_fields()

    async def model_card(self, model: str) -> ModelCard:
        """One model's card (an alias: its base model's); 404 for an unknown model."""
        await self.models.resolve(model)
        name = self.settings.model_name if self.models.is_base(model) else model
        return next(card for card in await self.model_cards() if card.id == name)

    async def model_cards(self) -> list[ModelCard]:
        base, *adapters = await self.models.names()
        return [ModelCard(id=base, root=base)] + [ModelCard(id=name, root=base, parent=base) for name in adapters]

    def _runtime_adapters(self) -> RuntimeAdapters:
        if self.settings.runtime_adapters is None:
            raise ApiError(404, "Loading and unloading adapters at run time is off: set `allow_runtime_adapters: true` "
                           "in the application's args (serve_config.yaml) to switch it on.", "invalid_request_error",
                           code="runtime_adapters_disabled")
        return self.settings.runtime_adapters

    async def load_adapter(self, name: str, source: str) -> None:
        """Register `name` and load it on one replica first (which checks the folder and the
        weights); a failure there is a 400 naming lora_path, and the name stays free."""
        registry = self._runtime_adapters()
        if self.models.is_configured(name):
            raise ApiError(400, f"`{name}` is already a model of this server (configured in its args)", param="lora_name")
        adapter = await registry.add(name, source)
        if adapter is None:
            raise ApiError(400, f"The lora adapter `{name}` has already been loaded; unload it first",
                           param="lora_name")
        try:
            await self.ask(self.backend.load_adapter(adapter), "load_lora_adapter")
        except BaseException:
            await registry.remove(name)
            raise

    async def unload_adapter(self, name: str) -> None:
        registry = self._runtime_adapters()
        if self.models.is_configured(name):
            raise ApiError(400, f"`{name}` is configured in the application's args and cannot be unloaded at run time",
                           param="lora_name")
        if not await registry.remove(name):
            raise ApiError(404, f"The lora adapter `{name}` is not loaded", "invalid_request_error", "lora_name",
                           "model_not_found")

    async def ask(self, answer: Awaitable[T | ApiError], what: str) -> T:
        """A replica's answer to a one-shot call (tokenize, ...); its ApiError raised, a failed
        call a 500 with the details in the log."""
        request_id = new_request_id()
        try:
            result = await answer
        except Exception as err:  # the replica died or the handle failed
            raise internal_error(request_id, f"{what}: {err!r}") from err
        if isinstance(result, ApiError):
            raise public(result, request_id)
        return result

    async def respond(self, call: GenerateCall, meta: ResponseMeta, stream: bool, usage: UsageWanted):
        if stream:
            return await self.stream_sse(call, meta, usage)
        buffers, end = await self.complete(call, meta, meta.kind)
        return meta.response(buffers.outputs(), Usage.of(end.stats))

    def _items(self, call: GenerateCall, meta: ResponseMeta, endpoint: str) -> AsyncIterator[Item]:
        """The call's items; with tools, its tool calls taken out of the text (tool_calls.py)."""
        items = self.requests.stream(call, meta.model, endpoint)
        return with_tool_calls(items, meta.tool_calls) if meta.tool_calls else items

    async def complete(self, call: GenerateCall, meta: ResponseMeta,
                       endpoint: str) -> tuple[ChoiceBuffers, RequestEnd]:
        """Run a call to its end: its choices, and the end that says it succeeded; raise ApiError
        if it fails."""
        buffers, end = _buffers_for(call, meta), None
        async with aclosing(self._items(call, meta, endpoint)) as items:
            try:
                async for item in items:
                    if isinstance(item, ApiError):
                        raise public(item, call.request_id)
                    if isinstance(item, ReplyEnd):
                        end = item.end
                        continue
                    buffers.collect(item)
                    if item.finish_reason:
                        buffers.end_choice(item)
            except ApiError as err:
                raise public(err, call.request_id) from None
            except Exception as err:  # the replica died or the handle failed
                raise internal_error(call.request_id, repr(err)) from err
        if end is None or end.failed:
            raise internal_error(call.request_id, end.error if end and end.error else "generation was interrupted")
        return buffers, end

    async def stream_sse(self, call: GenerateCall, meta: ResponseMeta, usage: UsageWanted):
        """Answer with SSE once the first item is in (so a refusal still gets its status)."""
        first, items = await self._opened(call, meta, meta.kind)
        frames = self._frames(call.request_id, first, items, meta, usage, _buffers_for(call, meta))
        return StreamingResponse(frames, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stream_responses(self, call: GenerateCall, meta: ResponseMeta, envelope: ResponseEnvelope):
        """/v1/responses' event stream (responses_stream.py), once the first item is in."""
        first, items = await self._opened(call, meta, "responses")
        buffers = _buffers_for(call, meta)
        events = response_events(call.request_id, first, items, ResponseEvents(envelope, buffers.logprobs), buffers)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _opened(self, call: GenerateCall, meta: ResponseMeta, endpoint: str) -> tuple[Item, AsyncIterator[Item]]:
        """The call's first item and the rest; a refusal or failure before the first item raises
        (an ApiError with its status, or a 500)."""
        items = self._items(call, meta, endpoint)
        try:
            first = await anext(items)
        except ApiError as err:
            raise public(err, call.request_id) from None
        except Exception as err:  # including a stream that ended before its first item
            await items.aclose()
            raise internal_error(call.request_id, f"before its first token: {err!r}") from err
        if isinstance(first, ApiError):
            await items.aclose()
            raise public(first, call.request_id)
        return first, items

    async def _frames(self, request_id: str, first: Item, items: AsyncIterator[Item], meta: ResponseMeta,
                      usage: UsageWanted, buffers: ChoiceBuffers) -> AsyncIterator[str]:
        """SSE frames of the items, then `[DONE]`; a failure becomes an error event before it."""
        done = False
        async with aclosing(items):
            try:
                if meta.kind == "chat":
                    if isinstance(first, Delta):
                        buffers.note_prompt(first)
                    yield "".join(sse(meta.chunk(role=True, index=i, usage=self._so_far(usage, buffers, i)))
                                  for i in range(len(buffers.per_choice)))
                frame, done = self._frame(request_id, first, meta, usage, buffers)
                yield frame
                async for item in items:
                    frame, done = self._frame(request_id, item, meta, usage, buffers)
                    yield frame
                if not done:
                    yield sse(internal_error(request_id, "the stream ended early").body)
            except Exception as err:
                yield sse(internal_error(request_id, f"mid-stream: {err!r}").body)
        yield DONE_FRAME

    def _frame(self, request_id: str, item: Item, meta: ResponseMeta, usage: UsageWanted,
               buffers: ChoiceBuffers) -> tuple[str, bool]:
        """SSE text for one item, and whether the stream is over (its end, or a refusal)."""
        if isinstance(item, ApiError):
            return sse(public(item, request_id).body), True
        if isinstance(item, ReplyEnd):
            return self._end_frame(request_id, item.end, meta, usage), True
        piece = buffers.piece(item)
        frame = ""
        if piece.text or piece.logprobs:
            frame = sse(meta.chunk(piece.text, index=item.index, logprobs=piece.logprobs,
                                   usage=self._so_far(usage, buffers, item.index)))
        if not item.finish_reason or item.failed:  # a failed choice: the error event comes with the end
            return frame, False
        buffers.end_choice(item)
        so_far = self._so_far(usage, buffers, item.index)
        if calls := tool_calls_of(item):
            frame += sse(meta.tool_call_chunk(calls, index=item.index, usage=so_far))
        frame += sse(meta.chunk(finish_reason=item.finish_reason, stats=item.stats, index=item.index, usage=so_far))
        return frame, False

    @staticmethod
    def _end_frame(request_id: str, end: RequestEnd, meta: ResponseMeta, usage: UsageWanted) -> str:
        """The request's end: an error event if it failed, else the usage chunk when asked for."""
        if end.failed:
            return sse(internal_error(request_id, end.error or "generation was cancelled").body)
        return sse(meta.usage_chunk(Usage.of(end.stats))) if usage.final else ""

    @staticmethod
    def _so_far(usage: UsageWanted, buffers: ChoiceBuffers, index: int) -> Usage | None:
        return buffers.usage_so_far(index) if usage.continuous else None


@dataclass(frozen=True)
class UsageWanted:
    """`stream_options`: a final usage chunk (`include_usage`), and with it usage in every chunk
    (vLLM's `continuous_usage_stats`, which like vLLM needs `include_usage`)."""

    final: bool = False
    continuous: bool = False


def _buffers_for(call: GenerateCall, meta: ResponseMeta) -> ChoiceBuffers:
    return ChoiceBuffers(meta.kind, call.overrides.n, call.overrides.logprobs is not None)


def _usage_wanted(body: ChatCompletionRequest | CompletionRequest) -> UsageWanted:
    options = body.stream_options
    if not (options and options.include_usage):
        return UsageWanted()
    return UsageWanted(final=True, continuous=options.continuous_usage_stats)
