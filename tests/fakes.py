"""Fakes shared by the HTTP-layer tests: a backend that plays back a script, and the stats and
chat body they use. (The engine itself is tested on real tiny models, not with these.)"""

from __future__ import annotations

from deployments.messages import ApiError, GenerateCall
from engine.request import RequestStats

STATS = RequestStats(prompt_tokens=5, completion_tokens=2, dropped_messages=0, latency=0.1,
                     time_to_first_token=0.05, tokens_per_second=20.0)
CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}]}


class ScriptedBackend:
    """Plays back a list of items for every call: refusals (ApiError) as items, other exceptions raised."""

    def __init__(self, script: list):
        self.script, self.calls = script, []

    async def stream(self, call: GenerateCall):
        self.calls.append(call)
        for item in self.script:
            if isinstance(item, Exception) and not isinstance(item, ApiError):  # refusals are items
                raise item
            yield item
