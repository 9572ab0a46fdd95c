"""Probation's latency verdict compares like with like: without enough live traffic, both
versions run the probes alternately, back to back, at the end of the window, and a regression
must show three times in a row. A model whose first run after an idle pause is slow (cold
caches, a clocked-down CPU: what spaced probes see on a real board) or that hits one hiccup
must not be rolled back for it, while a model that is really slower must be, even when the
prior version is the one a busy machine preempts at the verdict."""

from __future__ import annotations

import numpy as np

from edge_agent.lifecycle.deployer import Deployer, Deployment, DeviceContext, ProbationError
from edge_agent.lifecycle.probation import ProbationPolicy
from edge_agent.protocol.desired import SlotAssignment
from edge_agent.protocol.lifecycle import SlotEvent as Event
from edge_agent.runtimes import LoadOptions
from edge_agent.runtimes.fake import FakeModel
from edge_agent.serving import SlotTable
from tests.unit.test_serving import SPEC_IN, SPEC_OUT, serving

X = np.ones((1, 3), np.float32)
WINDOW_S = 5.0


class Clock:
    """The deployer's clock and sleep: sleeping advances time and leaves models idle."""

    def __init__(self) -> None:
        self.now = 0.0
        self.models: list[ColdStartModel] = []

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        for model in self.models:
            model.cold = True


class ColdStartModel(FakeModel):
    """Takes ``cold_s`` on the first run after an idle pause, ``warm_s`` on the next ones."""

    def __init__(
        self,
        clock: Clock,
        warm_s: float,
        cold_s: float,
        hiccup_runs: int = 0,
        hiccup_every: int = 0,
    ) -> None:
        super().__init__(SPEC_IN, SPEC_OUT, lambda f: {"y": f["x"] * 2}, latency_s=self._latency)
        self.warm_s, self.cold_s, self.cold = warm_s, cold_s, True
        #: Runs at the end of the window that are slow anyway (the board was busy): the next
        #: ``hiccup_runs`` ones, and every ``hiccup_every``-th one.
        self.clock, self.hiccup_runs, self.hiccup_every = clock, hiccup_runs, hiccup_every
        self.verdict_runs = 0
        clock.models.append(self)

    def _latency(self) -> float:
        at_verdict = self.clock.now >= WINDOW_S
        self.verdict_runs += int(at_verdict)
        periodic = at_verdict and self.hiccup_every and self.verdict_runs % self.hiccup_every == 0
        hiccup = at_verdict and self.hiccup_runs > 0
        self.hiccup_runs -= int(hiccup)
        hiccup = hiccup or bool(periodic)
        delay = self.cold_s if self.cold or hiccup else self.warm_s
        self.cold = False
        return delay


def _deploy_ctx(
    clock: Clock, new: ColdStartModel, prior: ColdStartModel | None = None
) -> tuple[Event, Deployment]:
    table = SlotTable()
    prior = prior or ColdStartModel(clock, warm_s=0.0005, cold_s=0.02)
    table.swap("main", serving(prior, "1.0.0"))
    policy = ProbationPolicy(window_s=WINDOW_S, probe_interval_s=1, min_latency_samples=10)
    deployer = Deployer(
        device=DeviceContext(
            device_id="cam-1",
            profile="x86-64-avx2",
            runtimes={},
            load_options=LoadOptions(),
            credential="",
            download_attempts=1,
            download_timeout_s=1,
        ),
        journal=None,  # type: ignore[arg-type]  # none of these is used by what is tested here
        store=None,  # type: ignore[arg-type]
        table=table,
        trust=None,  # type: ignore[arg-type]
        on_transition=lambda _: None,
        policy=policy,
        sleep=clock.sleep,
        clock=lambda: clock.now,
    )
    target = SlotAssignment(
        model="scaler", version="2.0.0", bundle_sha256="1" * 64, bundle_url="http://x", size=1
    )
    ctx = Deployment(slot="main", target=target, probe_inputs={"x": X})
    ctx.staged = serving(new, "2.0.0")
    deployer._measure_prior(ctx)
    deployer._switch(ctx)
    return deployer._probation(ctx), ctx


def _deploy(clock: Clock, new: ColdStartModel) -> Event:
    return _deploy_ctx(clock, new)[0]


def test_a_model_slow_only_after_idle_pauses_passes_probation() -> None:
    clock = Clock()
    assert _deploy(clock, ColdStartModel(clock, warm_s=0.0005, cold_s=0.02)) == Event.SUCCESS


def test_one_busy_moment_at_the_verdict_is_not_a_regression() -> None:
    clock = Clock()
    hiccup = ColdStartModel(clock, warm_s=0.0005, cold_s=0.02, hiccup_runs=11)
    assert _deploy(clock, hiccup) == Event.SUCCESS
    assert hiccup.hiccup_runs == 0  # the first measurement did see it


def test_a_really_slower_model_is_still_rolled_back() -> None:
    clock = Clock()
    event, ctx = _deploy_ctx(clock, ColdStartModel(clock, warm_s=0.02, cold_s=0.02))
    # 40x nominal; a loaded machine stretches the prior's 0.5 ms sleeps, so only the
    # policy's own limit (2x plus slack) is certain to be exceeded.
    assert event == Event.FAILURE and isinstance(ctx.error, ProbationError)
    assert ctx.error.reason == "latency_regression" and ctx.error.fields["ratio"] > 2


def test_a_slower_model_is_rolled_back_though_the_prior_is_preempted_each_round() -> None:
    """The prior hits one 100 ms stall in each round of ten runs (a busy CI machine, a board
    doing I/O): a p95 of ten runs would be that stall, and a candidate 40x slower than the
    prior would pass under it. The median is not moved by it."""
    clock = Clock()
    prior = ColdStartModel(clock, warm_s=0.0005, cold_s=0.1, hiccup_every=11)
    event, ctx = _deploy_ctx(clock, ColdStartModel(clock, warm_s=0.02, cold_s=0.02), prior)
    assert prior.verdict_runs >= 3 * 11  # three rounds of one warm-up and ten counted runs
    assert event == Event.FAILURE and isinstance(ctx.error, ProbationError)
    assert ctx.error.reason == "latency_regression" and ctx.error.fields["ratio"] > 2
