"""Whether one model version can take another's place without breaking its callers.

Applications call a slot with named inputs of given dtypes and shapes and read named outputs:
a version that renames an input, changes a dtype or a rank, fixes a dimension that was free
(or fixes it differently), or drops an output breaks them. So does an output whose declared
kind changed (class scores read as an embedding). A dimension that was fixed and is now free
accepts everything it accepted before, and a new output is ignored by old callers: neither is
a difference that breaks.
"""

from __future__ import annotations

from typing import Any

__all__ = ["io_differences"]


def _dims(spec: dict[str, Any]) -> list[int | str | None]:
    return list(spec.get("shape") or [])


def _tensors(
    side: str, old: list[dict[str, Any]], new: list[dict[str, Any]], *, outputs: bool
) -> list[str]:
    out: list[str] = []
    before = {s["name"]: s for s in old}
    after = {s["name"]: s for s in new}
    for name in before:
        if name not in after:
            others = sorted(set(after) - set(before))
            hint = f" (new {side}s: {', '.join(others)})" if others else ""
            out.append(f"{side} {name!r} is gone{hint}")
    if not outputs:
        for name in after:
            if name not in before:
                out.append(f"{side} {name!r} is new: callers do not send it")
    for name, a in before.items():
        b = after.get(name)
        if b is None:
            continue
        if a.get("dtype") != b.get("dtype"):
            out.append(f"{side} {name!r}: dtype {a.get('dtype')} → {b.get('dtype')}")
        da, db = _dims(a), _dims(b)
        if len(da) != len(db):
            out.append(f"{side} {name!r}: rank {len(da)} → {len(db)} ({da} → {db})")
        else:
            for i, (x, y) in enumerate(zip(da, db, strict=True)):
                if isinstance(y, int) and x != y:
                    was = x if isinstance(x, int) else f"free ({x})"
                    out.append(f"{side} {name!r}: dimension {i} {was} → {y}")
        if outputs and a.get("kind", "auto") != b.get("kind", "auto"):
            out.append(f"{side} {name!r}: kind {a.get('kind', 'auto')} → {b.get('kind', 'auto')}")
    return out


def io_differences(
    old_inputs: list[dict[str, Any]],
    old_outputs: list[dict[str, Any]],
    new_inputs: list[dict[str, Any]],
    new_outputs: list[dict[str, Any]],
) -> list[str]:
    """Each way the new version's inputs and outputs would break a caller of the old one."""
    return _tensors("input", old_inputs, new_inputs, outputs=False) + _tensors(
        "output", old_outputs, new_outputs, outputs=True
    )
