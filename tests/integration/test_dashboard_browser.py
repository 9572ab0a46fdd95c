"""The dashboard in a real headless Chromium (Debian's, driven by Playwright; never a
downloaded browser), against a real server, broker and two real agents: a rollout started
from the CLI appears and moves on the page, pause and resume from the page change it on the
server, the charts draw the agents' telemetry, a viewer gets no buttons and its POST is
refused, and no page logs a console error or asks another host for anything.

Screenshots of every page go to ``test-artifacts/dashboard/`` (or ``$EDGEFLEET_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest

from fleet_server.client import ApiClient
from fleet_server.demo.agents import LocalAgent, start_agents, wait_until
from fleet_server.server import EmbeddedStack
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_cli import edgefleet

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
#: What Chromium needs on these machines (DESIGN.md §5): no sandbox as root, no GPU, and no
#: background connections to hosts it cannot reach. Playwright gives it a fresh profile.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
]
ARTIFACTS = Path(
    os.environ.get("EDGEFLEET_TEST_ARTIFACTS")
    or Path(__file__).resolve().parents[2] / "test-artifacts"
)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is missing (scripts/test.sh installs it as root)")
        pytest.skip("Debian's chromium is not installed: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Watched:
    """A browser context and page that remember every console error, page error and request
    to a host other than the server's."""

    def __init__(self, browser: Any, base: str, **context: Any) -> None:
        self.base = base
        self.host = urlsplit(base).netloc
        self.context = browser.new_context(base_url=base, **context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", self._request)

    def _request(self, request: Any) -> None:
        url = urlsplit(request.url)
        if url.scheme in ("http", "https", "ws", "wss") and url.netloc != self.host:
            self.foreign.append(request.url)

    def sign_in(self, token: str, then: str = "/ui") -> None:
        self.page.goto(then)
        assert urlsplit(self.page.url).path == "/ui/signin"  # no session: sent to sign in
        self.page.fill("#token", token)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(f"**{then}")

    def shot(self, name: str, full_page: bool = True) -> Path:
        out = ARTIFACTS / "dashboard" / f"{name}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(out), full_page=full_page)
        return out

    def clean(self) -> None:
        assert self.errors == [], f"console errors: {self.errors}"
        assert self.foreign == [], f"requests to other hosts: {self.foreign}"


def _fleet(api: ApiClient, root: Path, model: Path, agents: list[LocalAgent]) -> None:
    """Two agents (added to ``agents``) serving classifier 1.0.0 under traffic, reporting
    every second."""
    calibration = root / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(0).standard_normal((256, 1, 16)).astype("f4"))
    api.upload_model(model, "classifier", "1.0.0", "first", calibration=calibration)
    devices = [(f"ui-edge-{i}", "x86-64-avx2") for i in (1, 2)]
    start_agents(api, root, devices, {"site": "lab", "ring": "canary"}, agents)
    first = api.post(
        "/v1/rollouts", json={"model": "classifier", "version": "1.0.0", "selector": "ring=canary"}
    )
    wait_until(lambda: api.get(f"/v1/rollouts/{first['id']}")["state"] == "completed", 60, "1.0.0")
    rows = np.random.default_rng(1).standard_normal((300, 1, 16)).astype(np.float32)
    for agent in agents:
        for row in rows:
            agent.client.predict("classifier", {"x": row})
    wait_until(
        lambda: sum(r["requests"] for r in api.get("/v1/telemetry/models/classifier")) >= 600,
        30,
        "the agents' telemetry",
    )


def test_the_dashboard_in_a_real_browser(
    chromium: Any, private_stack: EmbeddedStack, tmp_path: Path, model_path: Path,
    model_v2_path: Path,
) -> None:  # fmt: skip
    stack = private_stack
    api = ApiClient(stack.url, ADMIN_TOKEN)
    agents: list[LocalAgent] = []
    try:
        _fleet(api, tmp_path, model_path, agents)
        api.upload_model(model_v2_path, "classifier", "1.1.0", "second", parents=["1.0.0"])
        admin = Watched(chromium, stack.url, viewport={"width": 1280, "height": 900})
        admin.sign_in(ADMIN_TOKEN, then="/ui/rollouts")
        page = admin.page

        # A rollout started from the CLI appears on the open list without a reload.
        made = edgefleet(
            stack, "rollouts", "create", "--model", "classifier", "--version", "1.1.0",
            "--selector", "ring=canary", "--strategy", "canary", "--stages", "50,100",
            "--bake-s", "20", "--max-bake-s", "1", "--gate", "max_error_rate=0.5",
            "--no-wait", "--json",
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        rid = json.loads(made.stdout)["id"]
        page.locator(f'tr[data-rollout="{rid}"]').wait_for(timeout=15000)
        admin.shot("rollouts")

        # ... and moves on its own page: the stage's device serves 1.1.0, the page says so.
        page.click(f'tr[data-rollout="{rid}"] a')
        page.wait_for_url(f"**/ui/rollouts/{rid}")
        page.locator("#targets .b-serving").first.wait_for(timeout=60000)
        # The stage bakes once the engine has stepped on that report (a moment after the
        # device's report shows on the page: CI caught the page between the two).
        page.locator("#stages tr.current .b-baking").wait_for(timeout=30000)
        assert page.locator("#stages tr.current .b-baking").count() == 1

        # Pause and resume from the page change the rollout on the server.
        page.click("button[data-action=pause]")
        page.locator("#rollout-state .b-paused").wait_for()
        assert api.get(f"/v1/rollouts/{rid}")["state"] == "paused"
        assert "pause: done" in page.locator(".notice").inner_text()
        page.click("button[data-action=resume]")
        page.locator("#rollout-state .b-in_progress").wait_for()
        assert api.get(f"/v1/rollouts/{rid}")["state"] == "in_progress"
        # Resuming restarts the bake: the engine's next step settles the stage again, and
        # only a baking stage can be promoted (a running one is refused).
        page.locator("#stages tr.current .b-baking").wait_for(timeout=30000)
        admin.shot("rollout-baking")
        assert "max_error_rate" in page.locator("#gates").inner_text()
        # Promote cuts a stage's bake short; the page follows the rollout by itself.
        page.click("button[data-action=promote]")
        page.locator("#stages tr.current td:first-child", has_text="2").wait_for(timeout=60000)
        page.locator("#targets .b-serving").nth(1).wait_for(timeout=60000)
        # The last stage has no traffic, so no evidence: past max_bake_s it waits for a
        # person, who accepts it from the page.
        page.locator("#rollout-state .b-awaiting_approval").wait_for(timeout=60000)
        assert "no evidence" in page.locator(".state-line").inner_text()
        admin.shot("rollout-awaiting-evidence")
        page.click("button[data-action=promote]")
        page.locator("#rollout-state .b-completed").wait_for(timeout=60000)
        assert page.locator("button[data-action]").count() == 0
        kinds = page.locator("#events tr[data-kind]").evaluate_all(
            "rows => rows.map(r => r.dataset.kind)"
        )
        assert {"created", "paused", "resumed", "promoted", "completed"} <= set(kinds)
        admin.shot("rollout-completed")

        # The version page draws the fleet's telemetry.
        page.goto("/ui/models/classifier/versions/1.0.0")
        chart = page.locator('figure[data-chart="latency_ms"]')
        chart.locator("canvas").wait_for(timeout=20000)
        assert int(chart.get_attribute("data-points") or 0) >= 1
        assert page.locator("figure[data-chart=input_psi] canvas").count() == 1
        built = page.locator("#bundles").inner_text()
        assert "x86-64-avx2" in built and "100.0 %" in built, built  # top-1 agreement
        admin.shot("version")

        page.goto("/ui?selector=ring%3Dcanary")
        assert page.locator("#devices tr[data-device]").count() == 2
        assert "classifier 1.1.0" in page.locator("#devices").inner_text()
        admin.shot("fleet")
        page.click('#devices a[href="/ui/devices/ui-edge-1"]')
        page.wait_for_url("**/ui/devices/ui-edge-1")
        history = page.locator("#history").inner_text()
        assert "PROBATION → COMMITTED" in history, history
        admin.shot("device")
        for path, name in (("/ui/models", "models"), ("/ui/audit", "audit")):
            page.goto(path)
            admin.shot(name)
        assert "rollout.pause" in page.locator("#audit").inner_text()

        # Readable on a phone: the same page, a phone's viewport, nothing cut off sideways.
        phone = Watched(chromium, stack.url, viewport={"width": 390, "height": 844},
                        is_mobile=True, has_touch=True)  # fmt: skip
        phone.context.add_cookies(admin.context.cookies())
        phone.page.goto(f"/ui/rollouts/{rid}")
        overflow = phone.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 1, f"the page is {overflow}px wider than a phone"
        phone.shot("rollout-phone")
        admin.clean()
        phone.clean()

        # A viewer: the same pages, no buttons, and its own POST refused.
        viewer_token = api.post("/v1/tokens", json={"name": "wallboard", "role": "viewer"})
        second = api.post(
            "/v1/rollouts",
            json={"model": "classifier", "version": "1.0.0", "selector": "ring=canary",
                  "strategy": "canary", "stages": [50, 100], "bake_s": 600},
        )  # fmt: skip
        viewer = Watched(chromium, stack.url)
        viewer.sign_in(viewer_token["token"], then=f"/ui/rollouts/{second['id']}")
        viewer.page.locator("#stages").wait_for()
        assert viewer.page.locator("button[data-action]").count() == 0
        csrf = viewer.page.locator("input[name=csrf]").first.get_attribute("value")
        refused = viewer.page.request.post(
            f"/ui/rollouts/{second['id']}/abort", form={"csrf": csrf or ""}
        )
        assert refused.status == 403
        assert api.get(f"/v1/rollouts/{second['id']}")["state"] == "in_progress"
        viewer.shot("rollout-viewer")
        viewer.clean()
    except Exception:
        if "admin" in locals():
            admin.shot("failure")  # what the page showed when the test gave up
        raise
    finally:
        for agent in agents:
            agent.stop()
        api.close()


def test_a_page_without_a_session_goes_to_sign_in(
    chromium: Any, private_stack: EmbeddedStack
) -> None:
    stranger = Watched(chromium, private_stack.url)
    for path in ("/ui", "/ui/rollouts", "/ui/audit"):
        stranger.page.goto(path)
        assert urlsplit(stranger.page.url).path == "/ui/signin", path
    stranger.page.fill("#token", "efa_not-a-token")
    stranger.page.click("button[type=submit]")
    assert "unknown or revoked" in stranger.page.locator(".error").inner_text()
    stranger.shot("signin-refused")
    # The refused sign-in answered 401: Chromium reports that as a console error; nothing else.
    assert all("401" in e for e in stranger.errors), stranger.errors
    assert stranger.foreign == []
