"""Device labels and cohort selectors over REST and the CLI: set, remove, select, audit,
and refusals that change nothing."""

from __future__ import annotations

import json

import httpx
import pytest

from fleet_server.client import ApiClient, ApiError
from fleet_server.server import EmbeddedStack
from tests.integration.test_cli import edgefleet


def _enroll(stack: EmbeddedStack, api: ApiClient, device: str, profile: str, **labels: str) -> None:
    token = api.post("/v1/enrollment-tokens", json={"profile": profile, "labels": labels})["token"]
    httpx.post(
        f"{stack.url}/v1/devices/enroll",
        json={"token": token, "device_id": device, "profile": profile},
    ).raise_for_status()


def test_labels_change_by_rest_and_cli_and_selectors_choose_the_cohort(
    stack: EmbeddedStack, api: ApiClient, uid: str
) -> None:
    a, b, c = (f"lbl-{n}-{uid}" for n in "abc")
    _enroll(stack, api, a, "raspberry-pi-4", hw="rpi4", site="berlin")
    _enroll(stack, api, b, "raspberry-pi-4", hw="rpi4", site="paris", exempt="yes")
    _enroll(stack, api, c, "x86-64-avx2", hw="nuc", site="paris")

    def ids(selector: str) -> list[str]:
        found = api.get("/v1/devices", params={"selector": selector})
        return sorted(d["id"] for d in found if d["id"].endswith(uid))

    assert ids("hw=rpi4,site in (berlin,paris),!exempt") == [a]
    assert ids("profile=x86-64-avx2") == [c]
    assert ids("site notin (berlin)") == [b, c]

    changed = api.request(
        "PATCH", f"/v1/devices/{b}/labels", json={"set": {"ring": "canary"}, "remove": ["exempt"]}
    )
    assert changed["labels"] == {"hw": "rpi4", "site": "paris", "ring": "canary"}
    assert ids("hw=rpi4,site in (berlin,paris),!exempt") == [a, b]

    # The CLI, kubectl-style: key=value sets, key- removes.
    done = edgefleet(stack, "devices", "label", c, "ring=canary", "site-")
    assert done.returncode == 0, done.stderr
    assert f"{c}: hw=nuc,ring=canary" in done.stdout
    listed = edgefleet(stack, "devices", "list", "--selector", "ring=canary", "--json")
    assert sorted(d["id"] for d in json.loads(listed.stdout)) == sorted([b, c])
    events = api.get("/v1/audit", params={"action": "device.labels"})
    assert {e["target"] for e in events} >= {b, c}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"set": {"bad key!": "x"}}, "set"),
        ({"set": {"profile": "x86-64-avx2"}}, "set"),
        ({"set": {"site": "has space"}}, "set"),
        ({"set": {"site": "rome"}, "remove": ["site"]}, "remove"),
    ],
)
def test_a_bad_label_change_is_refused_and_changes_nothing(
    stack: EmbeddedStack, api: ApiClient, uid: str, body: dict[str, object], field: str
) -> None:
    device = f"lbl-bad-{uid}"
    _enroll(stack, api, device, "raspberry-pi-4", site="berlin")
    with pytest.raises(ApiError) as caught:
        api.request("PATCH", f"/v1/devices/{device}/labels", json=body)
    assert caught.value.status == 422
    assert (caught.value.fields.get("detail") or {}).get("field") == field, caught.value.fields
    assert api.get(f"/v1/devices/{device}")["labels"] == {"site": "berlin"}


def test_a_selector_that_does_not_parse_is_a_clear_error(
    stack: EmbeddedStack, api: ApiClient
) -> None:
    with pytest.raises(ApiError) as caught:
        api.get("/v1/devices", params={"selector": "site in (paris"})
    assert caught.value.status == 422 and "character 1" in str(caught.value)
    bad = edgefleet(stack, "devices", "list", "--selector", "a=b,")
    assert bad.returncode == 1 and "does not parse" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = edgefleet(stack, "devices", "label", "no-such-device", "a=b")
    assert missing.returncode == 1 and "not enrolled" in missing.stderr
