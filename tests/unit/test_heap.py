"""fleet_server.heap.settle: what start-up made is frozen (the collector never walks it
again), the young generation is collected less often, and cyclic garbage made afterwards is
still collected. In a fresh interpreter: settling changes the process it runs in."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_settle_freezes_start_up_and_still_collects_cycles_made_after() -> None:
    script = textwrap.dedent(
        """
        import gc, weakref
        from fleet_server.heap import YOUNG_THRESHOLD, settle

        class Node:
            pass

        assert gc.get_freeze_count() == 0
        settle()
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD

        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle: only the collector frees it
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
