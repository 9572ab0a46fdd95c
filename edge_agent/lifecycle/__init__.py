"""The per-slot deployment lifecycle: a transition table, handlers that return events, and a
journal written atomically before each step.

    states.py      the one transition table (states and events are the protocol's)
    journal.py     the crash-safe record of what each slot runs and is doing
    acceptance.py  the rules a desired-state document must pass
    deployer.py    runs a slot through the table; a newer document preempts it
    staging.py     load, self-test, warm-up
    probation.py   the policy and verdicts that decide whether a new version stays
"""

from edge_agent.lifecycle.journal import Journal, SlotRecord
from edge_agent.lifecycle.states import TRANSITIONS, next_state

__all__ = ["TRANSITIONS", "Journal", "SlotRecord", "next_state"]
