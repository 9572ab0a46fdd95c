from edge_agent.lifecycle.states import IN_FLIGHT, TERMINAL, TRANSITIONS, Event, State, next_state


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
