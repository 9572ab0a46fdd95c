from edge_agent.lifecycle.states import IN_FLIGHT, TERMINAL, TRANSITIONS, Event, State, next_state


def test_the_happy_path_reaches_committed() -> None:
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
        State.COMMITTED,
    ]


def test_every_step_can_fail_and_every_end_can_deploy_again() -> None:
    for state in IN_FLIGHT:
        assert TRANSITIONS[(state, Event.FAILURE)] == State.FAILED
    for state in (State.IDLE, *TERMINAL):
        assert TRANSITIONS[(state, Event.DEPLOY)] == State.DOWNLOADING


def test_no_deploy_while_a_deployment_is_in_flight() -> None:
    for state in IN_FLIGHT:
        assert (state, Event.DEPLOY) not in TRANSITIONS
