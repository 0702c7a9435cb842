"""The event stream of POST /v1/responses with `stream: true`, from the chat request's items.

Events as OpenAI names them, each an SSE frame `event: <type>` / `data: <json>` with a
`sequence_number` counting from 0: `response.created` and `response.in_progress` first; on the first
text `response.output_item.added` (a message), `response.content_part.added` (its output_text), then
`response.output_text.delta` per piece; at the end `response.output_text.done`,
`response.content_part.done` and `response.output_item.done` close the message, and each tool call
follows as `response.output_item.added` (a function_call), `response.function_call_arguments.delta`
(the whole arguments: calls are parsed once the reply is over, deployments/http/tool_calls.py),
`response.function_call_arguments.done` and `response.output_item.done`. The last event is
`response.completed`, or `response.incomplete` (reason max_output_tokens) when the token limit cut
the reply, with the whole Response. A failure after the stream began ends it with `response.failed`
(the error's message says only the request id, the log the details); a refusal (an ApiError with its
status) with an `error` event. There is no `[DONE]`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Literal

from pydantic import BaseModel, Field, RootModel

from engine.request import Delta

from deployments.contract.errors import ApiError, internal_error, public
from deployments.contract.replies import Item, ReplyEnd
from deployments.http.choice_buffers import ChoiceBuffers
from deployments.http.openai_format import ChatTokenLogprob, Usage
from deployments.http.tool_calls import tool_calls_of
from deployments.http.responses_format import (
    FunctionCallOut, ItemStatus, OutputItem, OutputMessage, OutputText, ResponseEnvelope, ResponseError, ResponseObject,
    function_call_item, item_status, message_item, new_message_id,
)


class Event(BaseModel):
    sequence_number: int


class LifecycleEvent(Event):
    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    response: ResponseObject


class OutputItemEvent(Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextEvent(Event):
    """Fields every output_text event carries."""

    item_id: str
    output_index: int
    content_index: int = 0
    logprobs: list[ChatTokenLogprob] = Field(default_factory=list)


class TextDeltaEvent(TextEvent):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    delta: str


class TextDoneEvent(TextEvent):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    text: str


class ArgumentsDeltaEvent(Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    arguments: str


class ErrorEvent(Event):
    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None


class ResponseStreamEvent(RootModel):
    """One event of a /v1/responses stream (for the OpenAPI document)."""

    root: Annotated[LifecycleEvent | OutputItemEvent | ContentPartEvent | TextDeltaEvent | TextDoneEvent
                    | ArgumentsDeltaEvent | ArgumentsDoneEvent | ErrorEvent, Field(discriminator="type")]


class ResponseEvents:
    """The events of one streamed response, as SSE text (see the module docstring). `logprobs`:
    the message's text carries logprobs (include message.output_text.logprobs)."""

    def __init__(self, envelope: ResponseEnvelope, logprobs: bool):
        self.envelope, self.with_logprobs = envelope, logprobs
        self.sequence = 0
        self.output: list[OutputItem] = []
        self.message_id: str | None = None  # the message item's, once opened
        self.text, self.logprobs = "", []

    def _frame(self, event_type: type[Event], **fields) -> str:
        event = event_type(sequence_number=self.sequence, **fields)
        self.sequence += 1
        return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"

    def _lifecycle(self, kind: str, response: ResponseObject) -> str:
        return self._frame(LifecycleEvent, type=kind, response=response)

    def start(self) -> str:
        response = self.envelope.response("in_progress")
        return self._lifecycle("response.created", response) + self._lifecycle("response.in_progress", response)

    def text_piece(self, text: str, logprobs: list[ChatTokenLogprob]) -> str:
        """A piece of the reply's text (opening the message item on the first)."""
        if not text and not logprobs:
            return ""
        frames = "" if self.message_id else self._open_message()
        self.text += text
        self.logprobs += logprobs
        return frames + self._frame(TextDeltaEvent, item_id=self.message_id, output_index=len(self.output),
                                    delta=text, logprobs=logprobs)

    def _open_message(self) -> str:
        self.message_id = new_message_id()
        index = len(self.output)
        return (self._frame(OutputItemEvent, type="response.output_item.added", output_index=index,
                            item=message_item(self.message_id, "", "in_progress"))
                + self._frame(ContentPartEvent, type="response.content_part.added", item_id=self.message_id,
                              output_index=index, part=OutputText(text="")))

    def finish(self, last: Delta, usage: Usage | None) -> str:
        """The closing events for the reply's last delta: the message, the tool calls, and
        response.completed (or .incomplete)."""
        status, calls = item_status(last.finish_reason), tool_calls_of(last)
        frames = self._close_message(status) if self.message_id or not calls else ""
        for call in calls:
            index, item = len(self.output), function_call_item(call, status)
            frames += self._frame(OutputItemEvent, type="response.output_item.added", output_index=index,
                                  item=function_call_item(call, "in_progress", arguments=""))
            frames += self._frame(ArgumentsDeltaEvent, item_id=item.id, output_index=index, delta=call.arguments)
            frames += self._frame(ArgumentsDoneEvent, item_id=item.id, output_index=index, arguments=call.arguments)
            frames += self._item_done(item)
        response = self.envelope.response("completed", self.output, usage, last.finish_reason)
        return frames + self._lifecycle(f"response.{response.status}", response)

    def _close_message(self, status: ItemStatus) -> str:
        frames = "" if self.message_id else self._open_message()
        item = message_item(self.message_id, self.text, status)
        item.content[0].logprobs = self.logprobs if self.with_logprobs else None
        index = len(self.output)
        frames += self._frame(TextDoneEvent, item_id=item.id, output_index=index, text=self.text,
                              logprobs=self.logprobs)
        frames += self._frame(ContentPartEvent, type="response.content_part.done", item_id=item.id,
                              output_index=index, part=item.content[0])
        return frames + self._item_done(item)

    def _item_done(self, item: OutputMessage | FunctionCallOut) -> str:
        frame = self._frame(OutputItemEvent, type="response.output_item.done", output_index=len(self.output),
                            item=item)
        self.output.append(item)
        return frame

    def failed(self, message: str) -> str:
        """response.failed: the output so far, and the error's public message."""
        error = ResponseError(code="server_error", message=message)
        return self._lifecycle("response.failed", self.envelope.response("failed", self.output, error=error))

    def error(self, err: ApiError) -> str:
        return self._frame(ErrorEvent, code=err.code or err.type, message=err.message, param=err.param)


async def response_events(request_id: str, first: Item, items: AsyncIterator[Item], events: ResponseEvents,
                          buffers: ChoiceBuffers) -> AsyncIterator[str]:
    """The SSE frames of a streamed response from its chat items (`first` already read); a
    failure ends the stream with response.failed, whose message says only the request id."""
    async with aclosing(items):
        try:
            yield events.start()
            frames, done = _frames_of(first, request_id, events, buffers)
            yield frames
            while not done:
                item = await anext(items, None)
                if item is None:
                    yield events.failed(internal_error(request_id, "the stream ended early").message)
                    return
                frames, done = _frames_of(item, request_id, events, buffers)
                yield frames
        except Exception as err:
            yield events.failed(internal_error(request_id, f"mid-stream: {err!r}").message)


def _frames_of(item: Item, request_id: str, events: ResponseEvents, buffers: ChoiceBuffers) -> tuple[str, bool]:
    """SSE text for one item, and whether the stream is over (its end, or a refusal)."""
    if isinstance(item, ApiError):
        err = public(item, request_id)
        return (events.failed(err.message) if err.status == 500 else events.error(err)), True
    if isinstance(item, ReplyEnd):
        end = item.end
        if end.failed:
            return events.failed(internal_error(request_id, end.error or "generation was cancelled").message), True
        return events.finish(buffers.per_choice[0].last, Usage.of(end.stats)), True
    piece = buffers.piece(item)
    frames = events.text_piece(piece.text, piece.logprobs.content or [] if piece.logprobs else [])
    if item.finish_reason and not item.failed:
        buffers.end_choice(item)
    return frames, False
