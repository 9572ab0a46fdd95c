"""The dashboard over real HTTP, on a real server and database: sign-in and its cookie, CSRF
on every action, roles, bearer callers, security headers, and that a refused action changes
nothing. (What a browser does with the pages: test_dashboard_browser.py.)"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleet_server.client import ApiClient
from fleet_server.server import EmbeddedStack
from tests.conftest import ADMIN_TOKEN
from tests.integration.test_api import enroll

PAGES = ["/ui", "/ui/rollouts", "/ui/models", "/ui/audit", "/ui/models/classifier/versions/1.0.0"]


@pytest.fixture
def fleet(api: ApiClient, model_path: Path) -> dict[str, Any]:
    """A model, two enrolled devices that never connect, and a canary rollout to them that
    therefore stays in progress (something to pause)."""
    api.upload_model(model_path, "classifier", "1.0.0", "first")
    enroll(api, "ui-dev-1", site="lab", ring="canary")
    enroll(api, "ui-dev-2", site="field")
    rollout = api.post(
        "/v1/rollouts",
        json={"model": "classifier", "version": "1.0.0", "devices": ["ui-dev-1", "ui-dev-2"]},
    )
    return rollout


def _browser(stack: EmbeddedStack) -> httpx.Client:
    return httpx.Client(base_url=stack.url, follow_redirects=False, timeout=30)


def _sign_in(stack: EmbeddedStack, token: str) -> tuple[httpx.Client, str]:
    """A signed-in client and its session's CSRF token (read off a page, as a browser does)."""
    client = _browser(stack)
    r = client.post("/ui/signin", data={"token": token, "next": "/ui/rollouts"})
    assert r.status_code == 303, r.text
    page = client.get("/ui").text
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, "the page carries the session's CSRF token in its forms"
    return client, found.group(1)


def _state(api: ApiClient, rollout_id: str) -> str:
    return str(api.get(f"/v1/rollouts/{rollout_id}")["state"])


def test_sign_in_sets_a_strict_http_only_session_cookie(stack: EmbeddedStack) -> None:
    client = _browser(stack)
    r = client.get("/ui/rollouts")
    assert r.status_code == 303 and r.headers["location"] == "/ui/signin?next=%2Fui%2Frollouts"
    hx = client.get("/ui/rollouts", headers={"HX-Request": "true"})
    assert hx.status_code == 204 and hx.headers["HX-Redirect"].startswith("/ui/signin")

    bad = client.post("/ui/signin", data={"token": "efa_wrong", "next": "/ui"})
    assert bad.status_code == 401 and "unknown or revoked API token" in bad.text
    assert "set-cookie" not in bad.headers

    r = client.post("/ui/signin", data={"token": ADMIN_TOKEN, "next": "/ui/rollouts"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/rollouts"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert ADMIN_TOKEN.lower() not in cookie  # the token never leaves the server again
    assert client.get("/ui/rollouts").status_code == 200

    # Sign-in never sends anyone to another host.
    r = client.post("/ui/signin", data={"token": ADMIN_TOKEN, "next": "//evil.example/ui"})
    assert r.headers["location"] == "/ui"


def test_every_page_loads_with_a_session_or_a_bearer_header(
    stack: EmbeddedStack, fleet: dict[str, Any]
) -> None:
    client, _ = _sign_in(stack, ADMIN_TOKEN)
    for path in [*PAGES, f"/ui/rollouts/{fleet['id']}", "/ui/devices/ui-dev-1"]:
        for r in (
            client.get(path),
            httpx.get(stack.url + path, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}),
        ):
            assert r.status_code == 200, (path, r.status_code, r.text[:300])
            assert r.headers["content-type"].startswith("text/html")
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert r.headers["x-frame-options"] == "DENY"
            # Nothing on a page comes from another host.
            assert not re.search(r'(src|href)="(https?:)?//', r.text), path
    assert "ui-dev-1" in client.get("/ui?selector=ring%3Dcanary").text
    assert "ui-dev-2" not in client.get("/ui?selector=ring%3Dcanary").text
    bad = client.get("/ui?selector=ring%20in%20(")
    assert bad.status_code == 422 and "selector" in bad.text.lower()
    missing = client.get("/ui/devices/no-such-device")
    assert missing.status_code == 404 and "no-such-device" in missing.text
    series = client.get("/ui/models/classifier/versions/1.0.0/series.json").json()
    assert series["x"] == [] and series["charts"] == {}  # no telemetry yet: nothing made up
    assert 3590 < series["to"] - series["from"] < 3610  # the window the charts span
    # A script's bad bearer header is refused, not redirected.
    r = httpx.get(stack.url + "/ui", headers={"Authorization": "Bearer efa_wrong"})
    assert r.status_code == 401


def test_actions_need_the_csrf_token_and_a_refusal_changes_nothing(
    stack: EmbeddedStack, api: ApiClient, fleet: dict[str, Any]
) -> None:
    rid = fleet["id"]
    assert _state(api, rid) == "in_progress"
    client, csrf = _sign_in(stack, ADMIN_TOKEN)
    page = client.get(f"/ui/rollouts/{rid}").text
    assert 'data-action="pause"' in page and 'data-action="abort"' in page

    for data in ({}, {"csrf": "forged"}):
        r = client.post(f"/ui/rollouts/{rid}/pause", data=data)
        assert r.status_code == 403 and "CSRF" in r.json()["error"]["message"]
    assert _state(api, rid) == "in_progress"
    # No cookie, no header: refused before the body is read.
    assert httpx.post(f"{stack.url}/ui/rollouts/{rid}/pause").status_code == 401

    r = client.post(f"/ui/rollouts/{rid}/pause", data={"csrf": csrf})
    assert r.status_code == 303 and "pause%3A+done" in r.headers["location"]
    assert _state(api, rid) == "paused"
    r = client.post(f"/ui/rollouts/{rid}/pause", data={"csrf": csrf})  # not in progress now
    assert "pause+refused" in r.headers["location"] and _state(api, rid) == "paused"
    r = client.post(
        f"/ui/rollouts/{rid}/resume", headers={"X-CSRF-Token": csrf}, data={"csrf": "x"}
    )
    assert r.status_code == 303 and _state(api, rid) == "in_progress"
    assert client.post(f"/ui/rollouts/{rid}/explode", data={"csrf": csrf}).status_code == 422
    audit = api.get("/v1/audit", params={"action": "rollout"})
    assert {"rollout.pause", "rollout.resume"} <= {e["action"] for e in audit}

    # A bearer caller (a script) has no session to forge: no CSRF token needed.
    r = httpx.post(
        f"{stack.url}/ui/rollouts/{rid}/pause", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert r.status_code == 303 and _state(api, rid) == "paused"


def test_a_viewer_sees_no_buttons_and_its_post_is_refused(
    stack: EmbeddedStack, api: ApiClient, fleet: dict[str, Any]
) -> None:
    rid = fleet["id"]
    token = api.post("/v1/tokens", json={"name": "wallboard", "role": "viewer"})["token"]
    client, csrf = _sign_in(stack, token)
    page = client.get(f"/ui/rollouts/{rid}").text
    assert "wallboard" in page and "data-action=" not in page
    assert 'href="/ui/audit"' not in page
    r = client.post(f"/ui/rollouts/{rid}/abort", data={"csrf": csrf})
    assert r.status_code == 403 and "operator" in r.json()["error"]["message"]
    assert _state(api, rid) == "in_progress"
    assert client.get("/ui/audit").status_code == 403  # as GET /v1/audit: admins only
    # The same refusal to a browser's form is a page that says why.
    page = client.post(
        f"/ui/rollouts/{rid}/abort", data={"csrf": csrf}, headers={"Accept": "text/html"}
    )
    assert page.status_code == 403 and "needs the operator role" in page.text
    assert page.headers["content-type"].startswith("text/html")
    assert _state(api, rid) == "in_progress"


def test_signing_out_or_revoking_the_token_ends_the_session(
    stack: EmbeddedStack, api: ApiClient
) -> None:
    made = api.post("/v1/tokens", json={"name": "ops", "role": "operator"})
    client, csrf = _sign_in(stack, made["token"])
    kept = dict(client.cookies)
    assert client.post("/ui/signout", data={"csrf": csrf}).status_code == 303
    replay = _browser(stack)
    replay.cookies.update(kept)
    assert replay.get("/ui").status_code == 303  # the stolen cookie is worth nothing now

    client, _ = _sign_in(stack, made["token"])
    assert client.get("/ui").status_code == 200
    api.request("DELETE", f"/v1/tokens/{made['id']}")
    assert client.get("/ui").status_code == 303
    signed = api.get("/v1/audit", params={"action": "ui.sign_in"})
    assert [e["actor"] for e in signed][:2] == ["ops", "ops"]


def test_the_sign_in_form_takes_a_small_body_only(stack: EmbeddedStack) -> None:
    r = httpx.post(f"{stack.url}/ui/signin", data={"token": "x" * 8192})
    assert r.status_code == 413
