"""The garbage collector's settings for the server's long-running processes.

CPython's cyclic collector runs whenever container allocations outnumber deallocations by
700, and now and then walks every tracked object in the process. A server process holds a few
hundred thousand objects from start-up (SQLAlchemy's mapped classes, pydantic's schemas,
FastAPI's routes) that live as long as it does, and its hot paths allocate containers by the
thousand: one ingest drain parses up to 500 telemetry batches into models that stay alive
until the drain is stored, so they are walked, promoted and walked again. Measured on the
telemetry ingest (``bench/telemetry_ingest.py``), collections took about 40 of every 140 µs
a batch spent in the store.

:func:`settle` is called once, when start-up is done: ``gc.freeze()`` moves every object
alive then into a permanent generation the collector never walks, and the youngest
generation's threshold rises so a drain's batches are collected with far fewer walks. Cyclic
garbage is still collected, just in larger steps.
"""

from __future__ import annotations

import gc

__all__ = ["YOUNG_THRESHOLD", "settle"]

#: Net container allocations between collections of the youngest generation (CPython: 700).
YOUNG_THRESHOLD = 10_000


def settle() -> None:
    """Freeze what start-up made and collect the young generation less often."""
    gc.collect()  # start-up's garbage is freed, not frozen
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
