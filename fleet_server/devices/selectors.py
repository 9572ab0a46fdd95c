"""Label selectors: which devices a cohort holds.

Syntax (Kubernetes-style set-based requirements, comma = and):

    hw=rpi4,site in (berlin,paris),!exempt,profile!=jetson-xavier-nx

- ``key=value`` (or ``==``), ``key!=value``;
- ``key in (a,b)``, ``key notin (a,b)``;
- ``key`` (the label is set), ``!key`` (it is not).

``profile`` names the device's profile, not a label, so one selector says both. A device
without the label fails ``=`` and ``in`` and passes ``!=`` and ``notin``, as in Kubernetes.
An empty selector matches every device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from fleet_server.errors import InvalidInputError

__all__ = ["LABEL_KEY_PATTERN", "LABEL_VALUE_PATTERN", "Requirement", "Selector"]

LABEL_KEY_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.\-/]{0,62})$"
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9_.\-]{0,63}$"
_KEY = r"[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}"
_VALUE = r"[A-Za-z0-9_.\-]{0,63}"
_TOKEN = re.compile(
    rf"\s*(?:(?P<not>!)\s*(?P<absent>{_KEY})"
    rf"|(?P<key>{_KEY})\s*(?:"
    rf"(?P<op>==|!=|=)\s*(?P<value>{_VALUE})"
    rf"|\s(?P<setop>in|notin)\s*\((?P<values>[^()]*)\)"
    r")?)\s*(?P<end>,|\Z)"
)
#: Selectors are short; a longer one is a mistake or an attack on the parser.
MAX_SELECTOR_CHARS = 4096

Op = Literal["=", "!=", "in", "notin", "exists", "!exists"]


@dataclass(frozen=True)
class Requirement:
    key: str
    op: Op
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str], profile: str) -> bool:
        value = profile if self.key == "profile" else labels.get(self.key)
        if self.op == "exists":
            return value is not None
        if self.op == "!exists":
            return value is None
        if self.op in ("=", "in"):
            return value is not None and value in self.values
        return value is None or value not in self.values  # != and notin

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!exists":
            return f"!{self.key}"
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        return f"{self.key} {self.op} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    requirements: tuple[Requirement, ...]

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Raises :class:`InvalidInputError` (field ``selector``) naming where it stopped."""
        if len(text) > MAX_SELECTOR_CHARS:
            raise InvalidInputError(
                f"selector of {len(text)} characters (limit {MAX_SELECTOR_CHARS})",
                field="selector",
            )
        if not text.strip():
            return cls(())
        requirements: list[Requirement] = []
        pos = 0
        while True:
            match = _TOKEN.match(text, pos)
            if match is None:
                raise InvalidInputError(
                    f"selector {text!r} does not parse at character {pos + 1}: expected "
                    "key=value, key!=value, key in (a,b), key notin (a,b), key or !key",
                    field="selector",
                )
            requirements.append(_requirement(match, text))
            pos = match.end()
            if match.group("end") != ",":
                return cls(tuple(requirements))

    @classmethod
    def from_labels(cls, labels: dict[str, str]) -> Selector:
        """Equality on every label (the older dict form)."""
        return cls(tuple(Requirement(k, "=", (v,)) for k, v in sorted(labels.items())))

    def matches(self, labels: dict[str, str], profile: str) -> bool:
        return all(r.matches(labels, profile) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


def _requirement(match: re.Match[str], text: str) -> Requirement:
    if match.group("absent"):
        return Requirement(match.group("absent"), "!exists")
    key = match.group("key")
    if match.group("op"):
        op: Op = "!=" if match.group("op") == "!=" else "="
        return Requirement(key, op, (match.group("value"),))
    if match.group("setop"):
        values = tuple(v.strip() for v in match.group("values").split(","))
        bad = [v for v in values if not re.fullmatch(_VALUE, v)]
        if not values or bad or values == ("",):
            raise InvalidInputError(
                f"selector {text!r}: {key} {match.group('setop')} needs values like (a,b)",
                field="selector",
            )
        return Requirement(key, "in" if match.group("setop") == "in" else "notin", values)
    return Requirement(key, "exists")
