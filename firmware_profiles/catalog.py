"""Loading profiles from TOML files, with errors that name the file and the field."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from firmware_profiles.errors import ProfileError
from firmware_profiles.schema import Profile

BUILTIN_DIR = Path(__file__).parent / "profiles"

#: msgspec's "<message> - at `$.resources.threads`"; a rule of the whole table has no path.
_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
#: A rule of a table that names its own field: "name: must be lowercase …".
_OWN_FIELD = re.compile(r"^(?P<field>[a-z_]+): (?P<message>.*)$", re.DOTALL)


def _where(error: ValueError) -> tuple[str, str]:
    """(field, message) of a schema error: ``("resources.threads", "Expected …")``."""
    match = _AT.match(str(error))
    assert match is not None  # the pattern matches any text
    path = re.sub(r"\[(\d+)\]", r".\1", match["path"] or "").lstrip(".")
    message = match["message"]
    own = _OWN_FIELD.match(message) if isinstance(error.__cause__, ValueError) else None
    unknown = re.match(r"^Object contains unknown field `([^`]*)`$", message)
    if unknown is not None:
        path = f"{path}.{unknown[1]}" if path else unknown[1]
    if own is not None:
        path = f"{path}.{own['field']}" if path else own["field"]
        message = own["message"]
    return path or "(top level)", message


def load_profile(path: Path) -> Profile:
    """Load and validate one profile file; the file's stem must equal its ``name``."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ProfileError(f"{path}: cannot read profile: {e.strerror}", file=str(path)) from e
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"{path.name}: not valid TOML: {e}", file=str(path)) from e
    try:
        profile = Profile.from_dict(data)
    except ValueError as e:
        field, message = _where(e)
        raise ProfileError(f"{path.name}: {field}: {message}", file=str(path), field=field) from e
    if profile.name != path.stem:
        raise ProfileError(
            f"{path.name}: name: {profile.name!r} must match the file name {path.stem!r}",
            file=str(path),
            field="name",
        )
    return profile


class ProfileCatalog:
    """All profiles in a directory, by name."""

    def __init__(self, profiles: dict[str, Profile]) -> None:
        self._profiles = dict(sorted(profiles.items()))

    @classmethod
    def load(cls, directory: Path = BUILTIN_DIR) -> ProfileCatalog:
        files = sorted(directory.glob("*.toml"))
        if not files:
            raise ProfileError(f"{directory}: no profile files (*.toml)", file=str(directory))
        return cls({p.stem: load_profile(p) for p in files})

    def get(self, name: str) -> Profile:
        try:
            return self._profiles[name]
        except KeyError:
            raise ProfileError(
                f"unknown device profile {name!r}; known profiles: {', '.join(self._profiles)}",
                reason="unknown_profile",
                profile=name,
            ) from None

    def names(self) -> list[str]:
        return list(self._profiles)

    def __iter__(self) -> Iterator[Profile]:
        return iter(self._profiles.values())

    def __contains__(self, name: object) -> bool:
        return name in self._profiles


@lru_cache(maxsize=1)
def default_catalog() -> ProfileCatalog:
    """The profiles shipped with edgefleet (validated once per process)."""
    return ProfileCatalog.load(BUILTIN_DIR)
