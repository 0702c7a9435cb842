"""The Gradio chat page, served at /ui by its own deployment, talking to the LLM by handle.

`build_ui(service, info)` makes the Blocks over the request path the HTTP API uses too
(deployments/frontend/service.py: limits, one request-log line and metrics per reply), so the page
can be driven without Ray; `ChatUI` is the Serve deployment that mounts it, with a handle to the LLM
deployment as the service's backend. No model code here.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, replace

import gradio as gr
from annotated_types import Ge, Gt, Le, Lt
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from engine.config import GenerationDefaults, SamplingOverrides, SamplingParams
from engine.prompt import ALPACA_CHAT_CONTEXT
from engine.request import RequestEnd

from deployments.contract.errors import ApiError, internal_error, public
from deployments.contract.messages import GenerateCall
from deployments.contract.replies import ReplyEnd
from deployments.frontend.guard import resolve_keys
from deployments.frontend.handle import HandleBackend
from deployments.frontend.request_log import RequestRecorder
from deployments.frontend.served_models import ServedModels
from deployments.frontend.service import RequestService
from deployments.telemetry.adapter_metrics import AdapterLabels
from deployments.ui.chat_state import CONTINUE_PROMPT, SUMMARIZE_PROMPT, Conversation
from deployments.ui.page_limit import KeyedLogins, PageLimit, PageLogins

CSS = "footer {display: none !important}"
# The page redraws a reply's whole Markdown on every update: at most this often while it streams
# (the first and the last update go at once). Faster than anyone reads, and it keeps a fast
# model from saturating the browser (at 300 tokens/s it stopped answering clicks for seconds).
PAGE_UPDATE_INTERVAL_S = 0.05


@dataclass(frozen=True)
class ModelInfo:
    """What the page needs to know about the served models."""

    models: tuple[str, ...]
    template: str
    defaults: GenerationDefaults
    max_messages: int = 256
    request_log_file: str | None = None
    rate_limit_per_minute: int | None = None  # the API's per-key limit (the llm application's)

    def served(self) -> ServedModels:
        """The page's model names (base first, then the adapters), for `stream_reply` to resolve."""
        return ServedModels(self.models[0], adapters=self.models[1:])


async def stream_reply(
    service: RequestService, conversation: Conversation, context: str, model: str, params: SamplingOverrides,
    models: ServedModels, refusal: ApiError | None = None,
) -> AsyncIterator[Conversation]:
    """Stream the reply to the conversation's last turn, yielding the growing conversation
    (at most once per PAGE_UPDATE_INTERVAL_S, and always the finished one; text that arrives
    in between is shown with the next update). Stop pressed or page closed: the stream closes,
    which frees the engine row. With a `refusal` (the page's rate limit), its message ends the
    reply instead, as does an unknown `model` (resolved by `models`, as the API resolves it)."""
    if refusal is not None:
        yield replace(conversation.finish_reply(None, f"⚠ {refusal.message}"), notice=f"⚠ {refusal.message}")
        return
    try:
        served = await models.resolve(model)
    except ApiError as unknown:
        yield conversation.finish_reply(None, f"⚠ {unknown.message}")
        return
    call = GenerateCall(params, messages=conversation.messages(context), **served.call_fields())
    shown_at, pending = -PAGE_UPDATE_INTERVAL_S, False
    try:
        async with aclosing(service.stream(call, model, "ui")) as items:
            async for item in items:
                if isinstance(item, ApiError):
                    yield conversation.finish_reply(None, f"⚠ {public(item, call.request_id).message}")
                    return
                ended = isinstance(item, ReplyEnd)
                if ended:
                    conversation = conversation.finish_reply(item.end.stats, _finish_note(call.request_id, item.end))
                elif item.text:
                    conversation = conversation.extend_reply(item.text)
                pending = True
                if ended or time.monotonic() - shown_at >= PAGE_UPDATE_INTERVAL_S:
                    shown_at, pending = time.monotonic(), False
                    yield conversation
        if pending:
            yield conversation
    except ApiError as refused:  # beyond the limits (e.g. too many messages)
        yield conversation.finish_reply(None, f"⚠ {public(refused, call.request_id).message}")


def slider_bounds(name: str, step: float, *, page_min: float | None = None,
                  page_max: float | None = None) -> tuple[float, float]:
    """A settings slider's (minimum, maximum): SamplingParams' bounds for field `name` (an
    exclusive one moved in by `step`), narrowed to `page_min`/`page_max` where given. Raises
    ValueError when an end is unbounded both in the field and on the page."""
    field_low, field_high = _field_bounds(name, step)
    low = max((b for b in (field_low, page_min) if b is not None), default=None)
    high = min((b for b in (field_high, page_max) if b is not None), default=None)
    if low is None or high is None:
        raise ValueError(f"{name} has no declared bound on one end: a slider needs the page's own")
    return low, high


def _field_bounds(name: str, step: float) -> tuple[float | None, float | None]:
    """The lowest and highest values on a `step` grid the field allows (pydantic keeps a Field's
    ge/gt/le/lt as annotated_types objects in its metadata); None where it has no bound."""
    low = high = None
    for bound in SamplingParams.model_fields[name].metadata:
        if isinstance(bound, Ge):
            low = bound.ge
        elif isinstance(bound, Gt):
            low = bound.gt + step
        elif isinstance(bound, Le):
            high = bound.le
        elif isinstance(bound, Lt):
            high = bound.lt - step
    return low, high


def _finish_note(request_id: str, end: RequestEnd) -> str:
    """What the reply's footer says about how it ended, when that is worth saying."""
    if end.failed:
        return f"⚠ {internal_error(request_id, end.error or 'generation failed').message}"
    if end.stats and end.stats.stop_reason == "repetition":
        return "stopped: the reply kept repeating itself"
    return ""


def build_ui(service: RequestService, info: ModelInfo,
             current_defaults: Callable[[], Awaitable[GenerationDefaults]] | None = None,
             limit: PageLimit = PageLimit(None)) -> gr.Blocks:
    """The chat page: chat, Context, Summarize, Continue, Stop, model choice, settings.
    `current_defaults`: asked on every page load, so the settings start at the server's
    generation defaults of the moment (`reconfigure` changes them without a restart).
    `limit`: replies per minute per key or address (each reply counts, Continue and Summarize too)."""
    base_model, models = info.models[0], info.served()
    default_context = ALPACA_CHAT_CONTEXT if info.template == "alpaca" else ""
    with gr.Blocks(title="lora-serve chat") as ui:
        state = gr.State(Conversation())
        gr.Markdown("## Chat")
        with gr.Row():
            model = gr.Dropdown(list(info.models), value=base_model, label="Model or adapter", scale=1)
            context = gr.Textbox(default_context, label="Context", lines=2, scale=3,
                                 placeholder="A system prompt: who the assistant is, what it knows")
        notice = gr.Markdown(elem_id="notice")
        chatbot = gr.Chatbot(label="Conversation", height=460, sanitize_html=True, render_markdown=True,
                             elem_id="chatbot")
        with gr.Row():
            message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                 elem_id="message")
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send-button")
            stop = gr.Button("Stop", elem_id="stop-button", variant="stop", scale=1)
        with gr.Row():
            summarize = gr.Button("Summarize", elem_id="summarize-button")
            continue_ = gr.Button("Continue", elem_id="continue-button")
            regenerate = gr.Button("Regenerate", elem_id="regenerate-button")
            undo = gr.Button("Undo", elem_id="undo-button")
            clear = gr.Button("Clear", elem_id="clear-button")
        with gr.Accordion("Generation settings", open=False):
            d = info.defaults
            # With live defaults, the settings unlock when the page's load has filled them in:
            # a change made earlier would be overwritten by the load's answer.
            ready = current_defaults is None
            # Bounds are SamplingParams' (engine/config.py); `page_min`/`page_max` are the page's own,
            # narrower ones: a slider needs finite bounds, and the fields have no maximum for top_k or
            # max_tokens (the server's max_tokens_cap is the real limit there).
            temperature = gr.Slider(*slider_bounds("temperature", 0.05), d.temperature, step=0.05,
                                    label="Temperature", interactive=ready)
            top_p = gr.Slider(*slider_bounds("top_p", 0.05), d.top_p, step=0.05, label="Top p", interactive=ready)
            top_k = gr.Slider(*slider_bounds("top_k", 1, page_max=200), d.top_k, step=1, label="Top k (0: off)",
                              interactive=ready)
            max_tokens = gr.Slider(*slider_bounds("max_tokens", 16, page_min=16, page_max=2048), d.max_tokens,
                                   step=16, label="Max new tokens", interactive=ready)
            repetition = gr.Slider(*slider_bounds("repetition_penalty", 0.05, page_min=1.0, page_max=2.0),
                                   d.repetition_penalty, step=0.05, label="Repetition penalty",
                                   interactive=ready)  # the page offers penalties only (1 is none), up to 2

        settings = [temperature, top_p, top_k, max_tokens, repetition]
        shown = [chatbot, state, notice]

        def params(temp, p, k, n, rep) -> SamplingOverrides:
            return SamplingOverrides(temperature=temp, top_p=p, top_k=int(k), max_tokens=int(n),
                                     repetition_penalty=rep)

        async def reply(request: gr.Request | None, conversation: Conversation, context_text: str,
                        model_name: str, *values):
            async for updated in stream_reply(service, conversation, context_text, model_name, params(*values),
                                              models, limit.refusal(request)):
                yield updated.display(), updated, updated.notice

        async def chat(request: gr.Request, text: str, conversation: Conversation, context_text: str,
                       model_name: str, *values):
            if not text.strip():
                return
            asked = conversation.ask(text)
            yield asked.display(), asked, "", ""
            async for shown_values in reply(request, asked, context_text, model_name, *values):
                yield *shown_values, ""

        async def continue_reply(request: gr.Request, conversation: Conversation, context_text: str,
                                 model_name: str, *values):
            if not conversation.exchanges:
                return
            async for shown_values in reply(request, conversation.ask(CONTINUE_PROMPT, hidden=True), context_text,
                                            model_name, *values):
                yield shown_values

        async def regenerate_reply(request: gr.Request, conversation: Conversation, context_text: str,
                                   model_name: str, *values):
            found = conversation.last_user_turn()
            if found is None:
                return
            earlier, prompt = found
            async for shown_values in reply(request, earlier.ask(prompt), context_text, model_name, *values):
                yield shown_values

        async def summarize_history(request: gr.Request, conversation: Conversation, context_text: str,
                                    model_name: str, *values):
            """Ask for a summary, put it into Context and start a fresh history (the seed's Summarize)."""
            if not conversation.exchanges:
                return
            if refusal := limit.refusal(request):  # the history and Context stay as they are
                yield context_text, conversation.display(), conversation, f"⚠ {refusal.message}"
                return
            summary = ""
            async for updated in stream_reply(service, conversation.ask(SUMMARIZE_PROMPT), context_text,
                                              model_name, params(*values), models):
                summary = updated.exchanges[-1].reply
                yield summary, conversation.display(), conversation, "Summarizing the conversation into Context..."
            fresh = Conversation()
            yield summary.strip(), fresh.display(), fresh, "The summary is now the Context; the history starts afresh."

        inputs = [state, context, model, *settings]
        events = [
            message.submit(chat, [message, *inputs], [*shown, message], api_name="chat"),
            send.click(chat, [message, *inputs], [*shown, message], api_name=False),
            continue_.click(continue_reply, inputs, shown, api_name="continue"),
            regenerate.click(regenerate_reply, inputs, shown, api_name="regenerate"),
            summarize.click(summarize_history, inputs, [context, *shown], api_name="summarize"),
        ]
        stop.click(None, None, None, cancels=events, api_name=False)
        if current_defaults is not None:
            async def load_defaults() -> tuple[float, float, int, int, float]:
                d = await current_defaults()
                return d.temperature, d.top_p, d.top_k, d.max_tokens, d.repetition_penalty

            unlock = [gr.update(interactive=True)] * len(settings)
            ui.load(load_defaults, None, settings, api_name="defaults").then(
                lambda: unlock, None, settings, api_name=False)
        undo.click(lambda c: (c.undo().display(), c.undo(), ""), [state], shown, api_name="undo")
        clear.click(lambda: ([], Conversation(), ""), None, shown, api_name="clear")
    # Gradio runs one call per event at a time unless told otherwise; the engine batches
    # everyone's requests, so let every session stream at once.
    ui.queue(default_concurrency_limit=None)
    return ui


def page_app(ui: gr.Blocks, logins: PageLogins | None = None) -> FastAPI:
    """The page as an ASGI app; with `logins`, behind a login (any user name, an API key as the
    password) whose key each session is counted by (deployments/ui/page_limit.py)."""
    app = FastAPI()
    if logins is None:
        return gr.mount_gradio_app(app, ui, path="/", css=CSS)
    app.add_middleware(KeyedLogins, logins=logins)
    return gr.mount_gradio_app(
        app, ui, path="/", css=CSS, auth=logins.check,
        auth_message="This chat needs an API key: enter any user name and the key as the password.",
    )


class ChatUI:
    """The Serve deployment that mounts the page; it holds only a handle to the LLM. With API
    keys the page's limit is the API's, per key; without, the ui application's, per address."""

    async def __init__(self, llm_app: str, api_keys: tuple[str, ...], rate_limit_per_minute: int | None = None):
        self.llm = serve.get_deployment_handle("LLMServer", app_name=llm_app)
        self.info = ModelInfo(**await self.llm.info.remote())
        keys = resolve_keys(api_keys)
        self.logins = PageLogins(keys) if keys else None
        per_minute = self.info.rate_limit_per_minute if keys else rate_limit_per_minute
        self.limit = PageLimit(per_minute, self.logins)

    def __serve_build_asgi_app__(self) -> FastAPI:
        recorder = RequestRecorder(self.info.request_log_file, AdapterLabels.of(self.info.models))
        service = RequestService(HandleBackend(self.llm), recorder.record, self.info.max_messages)
        return page_app(build_ui(service, self.info, self.current_defaults, self.limit), self.logins)

    async def current_defaults(self) -> GenerationDefaults:
        return (await self.llm.info.remote())["defaults"]


class UIArgs(BaseModel):
    """serve_config.yaml `args` of the `ui` application."""

    model_config = ConfigDict(extra="forbid")

    llm_app: str = Field("llm", description="The application whose LLMServer the page talks to.")
    api_keys: list[str] = Field(default_factory=list, repr=False, description="Also LLM_API_KEYS.")
    rate_limit_per_minute: int | None = Field(
        None, ge=1, description="Replies per minute per client address on the page when no API keys are set; "
        "with keys the page counts per key at the API's limit (the llm application's rate_limit_per_minute). "
        "None: no limit.")


def build_ui_app(args: dict) -> Application:
    """`serve_config.yaml` application `ui`; with API keys set, the page asks for one."""
    args = UIArgs.model_validate(args)
    deployment = serve.deployment(serve.ingress()(ChatUI)).options(
        name="ChatUI", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=200
    )
    return deployment.bind(args.llm_app, tuple(args.api_keys), args.rate_limit_per_minute)
