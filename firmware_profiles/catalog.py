"""Loading profiles from TOML files, with errors that name the file and the field."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from pydantic import ValidationError

from firmware_profiles.errors import ProfileError
from firmware_profiles.schema import Profile

BUILTIN_DIR = Path(__file__).parent / "profiles"


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


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
        profile = Profile.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = _field(first["loc"])
        raise ProfileError(
            f"{path.name}: {field}: {first['msg']}"
            + (f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""),
            file=str(path),
            field=field,
        ) from e
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
