"""Cohort selectors: the set-based label syntax, matching, and refusals that name the place."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleet_server.devices.selectors import Selector
from fleet_server.errors import InvalidInputError

PI_PARIS = ({"hw": "rpi4", "site": "paris"}, "raspberry-pi-4")


@pytest.mark.parametrize(
    ("text", "matches"),
    [
        ("", True),
        ("hw=rpi4", True),
        ("hw==rpi4", True),
        ("hw!=rpi4", False),
        ("hw=rpi5", False),
        ("site in (berlin,paris)", True),
        ("site in (berlin, rome)", False),
        ("site notin (berlin)", True),
        ("tier notin (gold)", True),  # no label: notin holds
        ("tier in (gold)", False),
        ("tier!=gold", True),
        ("site", True),
        ("!site", False),
        ("!exempt", True),
        ("profile=raspberry-pi-4", True),
        ("profile in (raspberry-pi-5,x86-64-avx2)", False),
        ("hw=rpi4, site in (berlin,paris) ,!exempt", True),
        ("hw=rpi4,site in (berlin,paris),exempt", False),
    ],
)
def test_set_based_requirements_match_labels_and_profile(text: str, matches: bool) -> None:
    selector = Selector.parse(text)
    assert selector.matches(*PI_PARIS) is matches
    # The canonical form reads back to the same selector.
    assert Selector.parse(str(selector)) == selector


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("hw=rpi4,", "character 9"),
        ("hw=rpi4 site=x", "character 1"),
        ("site in (paris", "character 1"),
        ("site in ()", "needs values"),
        ("!", "character 1"),
        ("=x", "character 1"),
        ("a" * 5000, "limit"),
    ],
)
def test_a_selector_that_does_not_parse_is_refused_naming_the_place(text: str, where: str) -> None:
    with pytest.raises(InvalidInputError, match=where) as caught:
        Selector.parse(text)
    assert caught.value.fields.get("field") == "selector"


@settings(max_examples=300, derandomize=True, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_cleanly(text: str) -> None:
    with contextlib.suppress(InvalidInputError):
        Selector.parse(text).matches({}, "x86-64-avx2")


def test_the_dict_form_is_equality_on_every_label() -> None:
    selector = Selector.from_labels({"site": "paris", "hw": "rpi4"})
    assert str(selector) == "hw=rpi4,site=paris" and selector.matches(*PI_PARIS)
