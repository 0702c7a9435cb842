"""The figures bench.lora_serving reports, computed from the workers' phase results.

- Calibration (per system and workload group): TTFT and TPOT p50 of the unloaded phase, the
  SLO (SLO_FACTOR times each), and the saturation rate: requests done per second of the
  closed loop (ours, before), or for peft, which serves one request at a time, 1 / the mean
  service time (first token's wait excluded: arrival to finish) of its unloaded requests.
- Point (one system at one offered rate): over the requests done (finished, no error), TTFT
  and TPOT percentiles, cold (waited for an adapter load) and warm TTFT; over all sent,
  goodput = requests done within both SLOs per second of the arrival window; over the
  requests started (adapter ready before the cutoff), cold requests and the hit rate (warm
  share); the system's adapter loads and evictions, engine steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from bench.percentiles import safe_percentile
from bench.lora_outcomes import Outcome, PhaseResult

SLO_FACTOR = 5.0  # a request meets the SLO with TTFT and TPOT at most this times the unloaded p50


@dataclass(frozen=True)
class Calibration:
    """One system's reference figures for one workload group (seconds, requests per second)."""

    system: str
    ttft: float  # unloaded TTFT p50
    tpot: float  # unloaded TPOT p50
    saturation: float
    saturation_tokens: float  # output tokens per second at saturation

    @property
    def slo_ttft(self) -> float:
        return SLO_FACTOR * self.ttft

    @property
    def slo_tpot(self) -> float:
        return SLO_FACTOR * self.tpot

    @classmethod
    def of(cls, system: str, unloaded: PhaseResult, closed: PhaseResult | None) -> Calibration:
        done = [o for o in unloaded.outcomes if o.done]
        ttft = safe_percentile([o.ttft for o in done], 50)
        tpot = safe_percentile([o.tpot for o in done if o.tpot is not None], 50)
        if closed is not None:
            finished = [o for o in closed.outcomes if o.done]
            rate, tokens = len(finished) / closed.wall, sum(o.tokens for o in finished) / closed.wall
        else:  # one request at a time: its capacity is 1 / the mean service time
            service = statistics.fmean(o.finished - o.arrival for o in done) if done else math.nan
            rate, tokens = 1 / service, statistics.fmean(o.tokens for o in done) / service if done else math.nan
        return cls(system, ttft, tpot, rate, tokens)


@dataclass(frozen=True)
class Point:
    """One system at one offered rate, measured once (one round)."""

    system: str
    result: PhaseResult
    calibration: Calibration
    duration: float  # seconds of arrivals

    @property
    def done(self) -> list[Outcome]:
        return [o for o in self.result.outcomes if o.done]

    @property
    def sent(self) -> int:
        return len(self.result.outcomes)

    @property
    def errors(self) -> int:
        return sum(o.error is not None for o in self.result.outcomes)

    @property
    def offered(self) -> float:
        return self.sent / self.duration

    @property
    def tokens_per_s(self) -> float:
        return sum(o.tokens for o in self.result.outcomes) / self.result.wall

    def ttft(self, q: float, keep: Callable[[Outcome], bool] = lambda o: True) -> float:
        return safe_percentile([o.ttft for o in self.done if keep(o)], q)

    def tpot(self, q: float) -> float:
        return safe_percentile([o.tpot for o in self.done if o.tpot is not None], q)

    def meets_slo(self, outcome: Outcome) -> bool:
        tpot = outcome.tpot
        return (outcome.done and outcome.ttft <= self.calibration.slo_ttft
                and (tpot is None or tpot <= self.calibration.slo_tpot))

    @property
    def goodput(self) -> float:
        """Requests done within both SLOs per second of the arrival window."""
        return sum(self.meets_slo(o) for o in self.result.outcomes) / self.duration

    @property
    def slo_share(self) -> float:
        """Share of the sent requests done within both SLOs."""
        return sum(self.meets_slo(o) for o in self.result.outcomes) / self.sent if self.sent else math.nan

    @property
    def started(self) -> list[Outcome]:
        """The requests whose adapter was ready before the cutoff."""
        return [o for o in self.result.outcomes if o.started is not None]

    @property
    def cold(self) -> int:
        return sum(o.cold for o in self.started)

    @property
    def hit_rate(self) -> float:
        """Share of the started requests that found their adapter resident."""
        return 1 - self.cold / len(self.started) if self.started else math.nan

    def rows_per_step(self) -> float:
        steps = self.result.steps
        return steps.rows / steps.steps if steps and steps.steps else math.nan

    def ms_per_step(self) -> float:
        steps = self.result.steps
        return 1000 * steps.seconds / steps.steps if steps and steps.steps else math.nan
