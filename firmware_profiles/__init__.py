"""Device profiles: one TOML file per kind of device, and the loader that validates them.

A profile says what a device can run (runtimes in order of preference, precisions, accelerator),
what it may hold (memory and bundle budgets) and what a compiled model must meet on it (parity
thresholds, latency budget). The fleet server picks build targets from it; the agent reads its
thread count and checks that a bundle was built for it.

Invariant: a loaded :class:`Profile` has been fully validated; any error names the file and
the field (``raspberry-pi-4.toml: resources.threads: Input should be greater than 0``).
"""

from typing import TYPE_CHECKING, Any

from firmware_profiles.errors import ProfileError

if TYPE_CHECKING:
    from firmware_profiles.catalog import ProfileCatalog, default_catalog, load_profile
    from firmware_profiles.schema import (
        Accelerator,
        Firmware,
        LatencyBudget,
        ParityThresholds,
        Precision,
        Profile,
        Resources,
        RuntimeName,
        RuntimeSpec,
    )

#: Loaded on first use (PEP 562), so that a program that only catches ``ProfileError`` (the
#: ``edgefleet`` CLI's every start) does not build the schema's models.
_LAZY = {
    **dict.fromkeys(("ProfileCatalog", "default_catalog", "load_profile"), "catalog"),
    **dict.fromkeys(
        ("Accelerator", "Firmware", "LatencyBudget", "ParityThresholds", "Precision",
         "Profile", "Resources", "RuntimeName", "RuntimeSpec"),
        "schema",
    ),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'firmware_profiles' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"firmware_profiles.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "Accelerator",
    "Firmware",
    "LatencyBudget",
    "ParityThresholds",
    "Precision",
    "Profile",
    "ProfileCatalog",
    "ProfileError",
    "Resources",
    "RuntimeName",
    "RuntimeSpec",
    "default_catalog",
    "load_profile",
]
