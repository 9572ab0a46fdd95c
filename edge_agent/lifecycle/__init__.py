"""The per-slot deployment lifecycle: a transition table, handlers that return events, and a
journal written atomically before each step."""

from edge_agent.lifecycle.journal import Journal, SlotRecord
from edge_agent.lifecycle.states import TRANSITIONS, Event, State, next_state

__all__ = ["TRANSITIONS", "Event", "Journal", "SlotRecord", "State", "next_state"]
