"""Probation: after a switch, watch the new version before committing to it.

What is judged, and when:

- errors (the runtime failed a request) and NaN/inf outputs, from live requests and from the
  probes (the bundle's self-test inputs, run every ``probe_interval_s``): at any moment of the
  window, so a bad version goes at the first sign (:func:`check_health`);
- latency against the prior version's, at the end of the window (:func:`check_latency`), like
  with like: the p95 on live traffic when both versions served ``min_latency_samples``
  requests; otherwise the median on the probes, both versions run alternately and back to
  back at the verdict (the spaced probes of the window each start cold and would make any
  version look slower). A few dozen back-to-back runs have no tail worth a p95: their p95 is
  the second-slowest run, which one preemption of the prior would lift above any candidate,
  while a median holds until half the runs are disturbed. A regression must show
  ``LATENCY_CONFIRMATIONS`` times in a row (the deployer's loop), so a busy moment during the
  candidate's runs does not roll it back either.

A newer desired state ends the window early (the deployer's ``superseded`` event); the prior
version stays loaded until the verdict, so switching back is a reference swap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta

from edge_agent.contracts.structs import Strict
from edge_agent.serving.stats import StatsSnapshot


class ProbationPolicy(Strict, frozen=True, kw_only=True):
    window_s: Annotated[float, Meta(ge=0)] = 30.0
    probe_interval_s: Annotated[float, Meta(gt=0)] = 1.0
    #: Errors per request above which the new version is rolled back.
    max_error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.01
    #: Roll back on any NaN/inf output.
    allow_nonfinite: bool = False
    #: New p95 may be at most this multiple of the prior's (plus ``latency_slack_ms``).
    max_latency_ratio: Annotated[float, Meta(gt=1)] = 2.0
    latency_slack_ms: Annotated[float, Meta(ge=0)] = 0.5
    min_latency_samples: Annotated[int, Meta(ge=1)] = 20


@dataclass(frozen=True)
class Breach:
    reason: str  # error_rate / nonfinite_outputs / latency_regression
    message: str
    figures: dict[str, float]


def check_health(
    live: StatsSnapshot, probes: StatsSnapshot, policy: ProbationPolicy
) -> Breach | None:
    """Errors and NaN/inf: judged at any time, so a bad version goes at the first sign."""
    requests = live.requests + probes.requests
    errors = live.errors + probes.errors
    nonfinite = live.nonfinite + probes.nonfinite
    if not policy.allow_nonfinite and nonfinite:
        return Breach(
            "nonfinite_outputs",
            f"{nonfinite} of {requests} responses had NaN/inf outputs",
            {"nonfinite": nonfinite, "requests": requests},
        )
    if requests and errors / requests > policy.max_error_rate:
        return Breach(
            "error_rate",
            f"{errors} of {requests} requests failed ({errors / requests:.1%} > "
            f"{policy.max_error_rate:.1%})",
            {"errors": errors, "requests": requests, "error_rate": errors / requests},
        )
    return None


def live_comparable(
    live: StatsSnapshot, prior_live: StatsSnapshot | None, policy: ProbationPolicy
) -> bool:
    """Enough live requests on both versions to compare their latency on real traffic."""
    enough = policy.min_latency_samples
    return (
        prior_live is not None
        and len(live.latency_ms) >= enough
        and len(prior_live.latency_ms) >= enough
    )


def check_latency(
    live: StatsSnapshot,
    prior_live: StatsSnapshot | None,
    probes: StatsSnapshot,
    prior_probe_p50_ms: float | None,
    policy: ProbationPolicy,
) -> Breach | None:
    """Live p95 against the prior's live p95 when both have enough requests, else the probe
    median against ``prior_probe_p50_ms`` (the prior's median on the same probes)."""
    if live_comparable(live, prior_live, policy):
        assert prior_live is not None
        new, old, basis, stat = live.p95(), prior_live.p95(), "live", "p95"
    else:
        new, old, basis, stat = probes.p50(), prior_probe_p50_ms, "probe", "p50"
    if new is None or old is None:
        return None
    limit = old * policy.max_latency_ratio + policy.latency_slack_ms
    if new > limit:
        return Breach(
            "latency_regression",
            f"{basis} latency {stat} {new:.2f} ms vs {old:.2f} ms for the prior version "
            f"(limit {limit:.2f} ms)",
            {
                f"{stat}_ms": new,
                f"prior_{stat}_ms": old,
                "ratio": new / old if old else float("inf"),
            },
        )
    return None
