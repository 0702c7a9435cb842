"""The repetition guard: stop a row that says the same thing over and over.

A loop is a unit of `period` tokens repeated back to back: each of the latest `run` tokens
equals the token `period` before it. The guard keeps that run for every period at which the
newest token occurred before (within `max_period`), so a token costs work in proportion to
how often it occurred lately, not to `max_period`. A row is looping once some unit has
repeated `min_repeats` times and the loop covers `min_tokens` tokens: a line said eight
times in a row, or a phrase or a token running on for a paragraph. Lists and code change
from line to line (numbers, names, indentation), so they do not qualify at the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import RepetitionGuardConfig


@dataclass
class RepetitionGuard:
    """Feeds on one row's sampled tokens; `feed` says when the row is looping."""

    config: RepetitionGuardConfig = field(default_factory=RepetitionGuardConfig)
    count: int = 0
    positions: dict[int, list[int]] = field(default_factory=dict)  # token -> where it occurred lately
    runs: dict[int, int] = field(default_factory=dict)  # period -> run ending at the newest token
    loop: tuple[int, int] | None = None  # (period, repeats) once looping

    def feed(self, token: int) -> bool:
        """Take the next token; True once the row is looping (then `loop` says how)."""
        if not self.config.min_repeats:
            return False
        now, self.count = self.count, self.count + 1
        recent = [pos for pos in self.positions.get(token, ()) if now - pos <= self.config.max_period]
        self.runs = {now - pos: self.runs.get(now - pos, 0) + 1 for pos in recent}
        self.positions[token] = recent + [now]
        for period, run in self.runs.items():
            repeats = run // period + 1
            if repeats >= self.config.min_repeats and run + period >= self.config.min_tokens:
                self.loop = (period, repeats)
                return True
        return False
