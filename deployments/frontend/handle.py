"""The LLM deployment as a front end's backend: a call's items streamed through a DeploymentHandle
(Serve's back-pressure becomes a 503 item), one-shot calls through the plain handle. Used by the
HTTP ingress (deployments/http/ingress.py) and the chat page (deployments/ui/page.py)."""

from __future__ import annotations

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from deployments.contract.errors import ApiError
from deployments.contract.messages import GenerateCall, TokenizeCall, Tokenized
from deployments.contract.replies import Item, ReplyEnd
from deployments.contract.runtime_adapters import RuntimeAdapter


class HandleBackend:
    """Streams a call from the LLM deployment; one-shot calls (tokenize, ...) go through the plain handle."""

    def __init__(self, handle: DeploymentHandle):
        self.calls = handle
        self.handle = handle.options(stream=True)

    def stream(self, call: GenerateCall) -> ShedWhenFull:
        return ShedWhenFull(self.handle.stream.remote(call))

    async def tokenize(self, call: TokenizeCall) -> Tokenized | ApiError:
        return await self.calls.tokenize.remote(call)

    async def detokenize(self, tokens: list[int]) -> str | ApiError:
        return await self.calls.detokenize.remote(tokens)

    async def load_adapter(self, adapter: RuntimeAdapter) -> ApiError | None:
        return await self.calls.load_runtime_adapter.remote(adapter)  # routed like a call for adapter.id


class ShedWhenFull:
    """A handle stream (an ItemStream, deployments/frontend/service.py) that turns Serve's
    back-pressure (replica queues full) into a 503 item, its last, and unpacks the last delta a
    ReplyEnd carries (deployments/contract/replies.py)."""

    def __init__(self, response: DeploymentResponseGenerator):
        self.response: DeploymentResponseGenerator | None = response  # None once shed
        self._unpacked: list[Item] = []  # the end, after the last delta it carried

    def __aiter__(self) -> ShedWhenFull:
        return self

    async def __anext__(self) -> Item:
        if self._unpacked:
            return self._unpacked.pop(0)
        if self.response is None:
            raise StopAsyncIteration
        try:
            item = await self.response.__anext__()
        except BackPressureError:
            self.response = None
            return ApiError(503, "the server is at capacity; retry shortly")
        if isinstance(item, ReplyEnd):
            first, *self._unpacked = item.items()
            return first
        return item

    def cancel(self) -> None:
        if self.response is not None:
            self.response.cancel()
