"""Prefix keys of a generation call, and where each key was last served: the routing state.

A chat's next turn re-sends the whole conversation, so its prompt starts with the previous turn's
prompt: the replica that served that prompt holds its KV blocks in its prefix cache
(engine/blocks.py). The router (deployments/routing/router.py) finds that replica by key:

- `call_keys(call)`: a hash chain over the call. Chats: the adapter's name first, then role and
  content of each message; only the keys that cover at least the system prompt and the first
  user message are kept, so conversations that share only a system prompt share no key (they
  would otherwise all pile onto one replica, and every replica caches a popular system prompt
  anyway). Completions: the chain over full chunks of the prompt's characters (token ids).
  Keys are blake2b digests, the same in every process (Python's `hash` is salted per process).
- `PrefixTable`: a bounded LRU of key -> id of the replica that last served a call with it.
- `rendezvous(key, replicas)`: highest-random-weight hashing, for a key nobody has seen: every
  router (each ingress replica and the chat page have their own) places a new conversation on
  the same replica without shared state, and when a replica leaves only its keys move.

Plain Python with no imports from this project: Serve pickles the router's module by value
into every process that holds a handle, and this module goes with it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

Key = bytes


def _chain(previous: Key, *parts: bytes) -> Key:
    """The next key of a chain: a digest of the previous key and the length-prefixed parts."""
    digest = hashlib.blake2b(previous, digest_size=16)
    for part in parts:
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.digest()


def chat_keys(adapter: str | None, messages: Sequence[Any]) -> list[Key]:
    """One key per message, from the one that ends the first user message on (the shortest
    key covers the system prompt, if any, and the first user message)."""
    key = _chain(b"chat", (adapter or "").encode())
    keys: list[Key] = []
    seen_user = False
    for message in messages:
        key = _chain(key, message.role.encode(), message.content.encode("utf-8", "surrogatepass"))
        seen_user = seen_user or message.role == "user"
        if seen_user:
            keys.append(key)
    return keys


def prompt_keys(adapter: str | None, prompt: str | Sequence[int], chunk: int) -> list[Key]:
    """One key per full chunk of `chunk` characters (or chunk // 4 token ids) of a prompt;
    a prompt shorter than one chunk has none (it gains little from a prefix cache)."""
    if isinstance(prompt, str):
        data, step = prompt.encode("utf-32-le", "surrogatepass"), 4 * chunk
    else:
        data, step = b"".join(int(t).to_bytes(4, "little") for t in prompt), 4 * max(1, chunk // 4)
    key = _chain(b"prompt", (adapter or "").encode())
    keys: list[Key] = []
    for end in range(step, len(data) + 1, step):
        key = _chain(key, data[end - step:end])
        keys.append(key)
    return keys


def call_keys(call: Any, chunk: int) -> list[Key]:
    """The keys of a GenerateCall (deployments/contract/messages.py), read by duck typing; [] for
    anything else (info(), diagnostics(), ...). An Instruction prompt counts as its text."""
    adapter = getattr(call, "adapter", None)
    messages = getattr(call, "messages", None)
    if messages:
        return chat_keys(adapter, messages)
    prompt = getattr(call, "prompt", None)
    if hasattr(prompt, "instruction"):
        prompt = f"{prompt.instruction}\0{prompt.input}"
    if isinstance(prompt, (str, list, tuple)):
        return prompt_keys(adapter, prompt, chunk)
    return []


def rendezvous(key: Key, replicas: Iterable[str]) -> str:
    """The replica with the highest weight for `key` (highest-random-weight hashing): the same
    answer everywhere for the same set, and removing a replica moves only the keys it had."""
    return max(replicas, key=lambda replica: _chain(key, replica.encode()))


class PrefixTable:
    """Key -> id of the replica that last served a call with that key; at most `capacity`
    entries, the least recently used dropped first. Not thread-safe: one owner (the router's
    event loop)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("a PrefixTable needs room for at least one key")
        self.capacity = capacity
        self._entries: OrderedDict[Key, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, keys: Iterable[Key], replica: str) -> None:
        """`replica` served a call with these keys."""
        for key in keys:
            self._entries[key] = replica
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def lookup(self, keys: Sequence[Key], candidates: set[str], alive: set[str]) -> str | None:
        """The replica of the longest key whose replica is among `candidates`. Entries of
        replicas not `alive` (gone from the deployment) are dropped on the way."""
        for key in reversed(keys):
            replica = self._entries.get(key)
            if replica is None:
                continue
            if replica not in alive:
                del self._entries[key]
            elif replica in candidates:
                self._entries.move_to_end(key)
                return replica
        return None
