from edge_agent.lifecycle.states import IN_FLIGHT, TERMINAL, TRANSITIONS, next_state
from edge_agent.protocol.lifecycle import SlotEvent as Event
from edge_agent.protocol.lifecycle import SlotState as State


def test_the_happy_path_reaches_committed_through_probation() -> None:
    state = next_state(State.IDLE, Event.DEPLOY)
    seen = [state]
    while state not in TERMINAL:
        state = next_state(state, Event.SUCCESS)
        seen.append(state)
    assert seen == [
        State.DOWNLOADING,
        State.VERIFYING,
        State.STAGING,
        State.SWITCHING,
        State.PROBATION,
        State.COMMITTED,
    ]


def test_a_failed_probation_rolls_back() -> None:
    state = next_state(State.PROBATION, Event.FAILURE)
    assert state == State.ROLLING_BACK
    assert next_state(state, Event.SUCCESS) == State.ROLLED_BACK


def test_every_step_before_the_switch_fails_to_failed() -> None:
    for state in (State.DOWNLOADING, State.VERIFYING, State.STAGING, State.SWITCHING):
        assert TRANSITIONS[(state, Event.FAILURE)] == State.FAILED


def test_every_end_can_deploy_again_and_nothing_deploys_mid_flight() -> None:
    for state in (State.IDLE, *TERMINAL):
        assert TRANSITIONS[(state, Event.DEPLOY)] == State.DOWNLOADING
    for state in IN_FLIGHT:
        assert (state, Event.DEPLOY) not in TRANSITIONS
        assert (state, Event.FAILURE) in TRANSITIONS


def test_the_table_has_no_dead_ends() -> None:
    for state in State:
        assert any(s == state for s, _ in TRANSITIONS), f"no way out of {state}"


def test_a_newer_document_or_a_crash_ends_any_step_and_probation_rolls_back() -> None:
    for event in (Event.SUPERSEDED, Event.INTERRUPTED):
        for state in (State.DOWNLOADING, State.VERIFYING, State.STAGING, State.SWITCHING):
            assert TRANSITIONS[(state, event)] == State.FAILED
        assert TRANSITIONS[(State.PROBATION, event)] == State.ROLLING_BACK


def test_a_committed_version_that_cannot_be_restored_rolls_back() -> None:
    # Whatever the slot's last deployment ended in, its committed version is what start-up
    # loads; when it cannot, the previous one serves.
    for state in TERMINAL:
        assert next_state(state, Event.FAILURE) == State.ROLLED_BACK
