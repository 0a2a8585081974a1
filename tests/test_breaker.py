"""Tests for the pure circuit-breaker state machine in ``persistence.write.breaker``.

Time is a plain float that the tests advance by hand; nothing sleeps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from persistence.write.breaker import Admission, BreakerState, CircuitBreaker, Transition
from tests.support.databases import examples

T0 = 1000.0  # arbitrary monotonic start time, deliberately not zero


def fail_times(breaker: CircuitBreaker, times: int, now: float = T0) -> list[Transition | None]:
    """Admit and fail ``times`` attempts at ``now``, returning each record_failure result."""
    results: list[Transition | None] = []
    for _ in range(times):
        admission, _ = breaker.admit(now)
        assert admission.allowed
        results.append(breaker.record_failure(admission, now))
    return results


def report(breaker: CircuitBreaker, admission: Admission, outcome: str, now: float) -> Transition | None:
    """Report ``outcome`` for ``admission`` through the matching ``record_*`` method."""
    if outcome == "success":
        return breaker.record_success(admission, now)
    if outcome == "failure":
        return breaker.record_failure(admission, now)
    assert outcome == "cancelled"
    breaker.record_cancelled(admission)
    return None


def opened_breaker(now: float = T0) -> CircuitBreaker:
    breaker = CircuitBreaker()
    fail_times(breaker, 5, now)
    assert breaker.state is BreakerState.OPEN
    return breaker


def half_open_breaker(opened: float = T0) -> CircuitBreaker:
    breaker = opened_breaker(opened)
    assert breaker.poll(opened + 30.0) is not None
    assert breaker.state is BreakerState.HALF_OPEN
    return breaker


# --------------------------------------------------------------------------- construction


def test_new_breaker_is_closed_with_defaults() -> None:
    breaker = CircuitBreaker()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.failure_threshold == 5
    assert breaker.reset_seconds == 30.0
    assert breaker.consecutive_failures == 0
    assert breaker.generation == 0
    assert breaker.opened_at is None
    assert breaker.seconds_until_half_open(T0) == 0.0


def test_breaker_state_values_are_the_documented_strings() -> None:
    assert [s.value for s in BreakerState] == ["closed", "open", "half_open"]
    assert str(BreakerState.HALF_OPEN) == "half_open"


@pytest.mark.parametrize(
    ("threshold", "reset"),
    [(0, 30.0), (-1, 30.0), (5, 0.0), (5, -1.0), (5, math.nan)],
)
def test_invalid_constructor_arguments_raise_value_error(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError, match=r"failure_threshold|reset_seconds"):
        CircuitBreaker(failure_threshold=threshold, reset_seconds=reset)


def test_minimal_valid_constructor_arguments_are_accepted() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=0.001)
    assert breaker.failure_threshold == 1
    assert breaker.reset_seconds == 0.001


# --------------------------------------------------------------------------- closed -> open


def test_closed_breaker_admits_non_probe_calls_in_current_generation() -> None:
    breaker = CircuitBreaker()
    admission, transition = breaker.admit(T0)
    assert admission == Admission(allowed=True, generation=0, probe=False)
    assert transition is None


def test_breaker_opens_after_five_consecutive_failures() -> None:
    breaker = CircuitBreaker()
    assert fail_times(breaker, 4) == [None] * 4
    assert (breaker.state, breaker.consecutive_failures) == (BreakerState.CLOSED, 4)

    admission, _ = breaker.admit(T0 + 1.0)
    transition = breaker.record_failure(admission, T0 + 1.0)

    assert transition == Transition(
        from_state=BreakerState.CLOSED,
        to_state=BreakerState.OPEN,
        at=T0 + 1.0,
        consecutive_failures=5,
    )
    assert breaker.state is BreakerState.OPEN
    assert breaker.opened_at == T0 + 1.0
    assert breaker.generation == 1


def test_breaker_does_not_open_after_four_consecutive_failures() -> None:
    breaker = CircuitBreaker()
    fail_times(breaker, 4)
    assert breaker.state is BreakerState.CLOSED
    admission, _ = breaker.admit(T0)
    assert admission.allowed


def test_custom_failure_threshold_is_respected() -> None:
    breaker = CircuitBreaker(failure_threshold=2)
    assert fail_times(breaker, 1) == [None]
    assert breaker.state is BreakerState.CLOSED
    [transition] = fail_times(breaker, 1)
    assert transition is not None
    assert transition.to_state is BreakerState.OPEN
    assert transition.consecutive_failures == 2


def test_success_in_closed_resets_consecutive_failure_count() -> None:
    breaker = CircuitBreaker()
    fail_times(breaker, 4)
    admission, _ = breaker.admit(T0)
    assert breaker.record_success(admission, T0) is None
    assert breaker.consecutive_failures == 0
    assert breaker.generation == 0

    # Four more failures would have opened the breaker had the count not been reset.
    assert fail_times(breaker, 4) == [None] * 4
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 4
    [transition] = fail_times(breaker, 1)
    assert transition is not None
    assert transition.to_state is BreakerState.OPEN


# --------------------------------------------------------------------------- open -> half_open


def test_open_breaker_refuses_admission_before_reset_period() -> None:
    breaker = opened_breaker()
    admission, transition = breaker.admit(T0 + 29.9)
    assert admission == Admission(allowed=False, generation=1, probe=False)
    assert transition is None
    assert breaker.state is BreakerState.OPEN


def test_breaker_stays_open_before_30_seconds_and_half_opens_at_30_seconds() -> None:
    breaker = opened_breaker()
    assert breaker.poll(T0 + 29.999) is None
    assert (breaker.state, breaker.generation) == (BreakerState.OPEN, 1)

    transition = breaker.poll(T0 + 30.0)
    assert transition == Transition(
        from_state=BreakerState.OPEN,
        to_state=BreakerState.HALF_OPEN,
        at=T0 + 30.0,
        consecutive_failures=5,
    )
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.generation == 2
    assert breaker.poll(T0 + 31.0) is None  # already half-open: no repeated transition


def test_state_property_is_lazy_until_given_a_time() -> None:
    breaker = opened_breaker()
    # Time has "passed" but the breaker has not been told, so it still reports open.
    assert breaker.state is BreakerState.OPEN
    assert breaker.seconds_until_half_open(T0 + 45.0) == 0.0
    assert breaker.state is BreakerState.OPEN


def test_admit_after_reset_period_half_opens_and_admits_the_probe() -> None:
    breaker = opened_breaker()
    admission, transition = breaker.admit(T0 + 30.0)
    assert transition is not None
    assert (transition.from_state, transition.to_state) == (BreakerState.OPEN, BreakerState.HALF_OPEN)
    assert admission == Admission(allowed=True, generation=2, probe=True)
    assert breaker.state is BreakerState.HALF_OPEN


def test_seconds_until_half_open_reports_remaining_open_time_and_never_goes_negative() -> None:
    breaker = CircuitBreaker()
    assert breaker.seconds_until_half_open(T0) == 0.0
    fail_times(breaker, 5)
    assert breaker.seconds_until_half_open(T0) == 30.0
    assert breaker.seconds_until_half_open(T0 + 10.0) == pytest.approx(20.0)
    assert breaker.seconds_until_half_open(T0 + 30.0) == 0.0
    assert breaker.seconds_until_half_open(T0 + 500.0) == 0.0
    breaker.poll(T0 + 30.0)
    assert breaker.seconds_until_half_open(T0 + 30.0) == 0.0


def test_custom_reset_seconds_is_respected() -> None:
    breaker = CircuitBreaker(failure_threshold=1, reset_seconds=2.5)
    fail_times(breaker, 1)
    assert breaker.seconds_until_half_open(T0) == 2.5
    assert breaker.poll(T0 + 2.4) is None
    assert breaker.poll(T0 + 2.5) is not None


# --------------------------------------------------------------------------- half_open


def test_half_open_admits_only_one_probe_at_a_time() -> None:
    breaker = half_open_breaker()
    probe, _ = breaker.admit(T0 + 30.0)
    assert probe.allowed
    assert probe.probe

    for later in (T0 + 30.0, T0 + 31.0, T0 + 120.0):
        refused, transition = breaker.admit(later)
        assert refused == Admission(allowed=False, generation=probe.generation, probe=False)
        assert transition is None
    assert breaker.state is BreakerState.HALF_OPEN


def test_probe_success_closes_the_breaker_and_resets_failures() -> None:
    breaker = half_open_breaker()
    probe, _ = breaker.admit(T0 + 31.0)
    transition = breaker.record_success(probe, T0 + 32.0)
    assert transition == Transition(
        from_state=BreakerState.HALF_OPEN,
        to_state=BreakerState.CLOSED,
        at=T0 + 32.0,
        consecutive_failures=0,
    )
    assert breaker.state is BreakerState.CLOSED
    assert breaker.consecutive_failures == 0
    assert breaker.opened_at is None
    assert breaker.generation == 3

    admission, _ = breaker.admit(T0 + 32.0)
    assert admission == Admission(allowed=True, generation=3, probe=False)
    # A fresh full threshold is needed to open again.
    assert fail_times(breaker, 4, T0 + 33.0) == [None] * 4
    assert breaker.state is BreakerState.CLOSED


def test_probe_failure_reopens_for_a_full_reset_period() -> None:
    breaker = half_open_breaker()
    probe, _ = breaker.admit(T0 + 30.0)
    failed_at = T0 + 35.0
    transition = breaker.record_failure(probe, failed_at)
    assert transition is not None
    assert (transition.from_state, transition.to_state) == (BreakerState.HALF_OPEN, BreakerState.OPEN)
    assert transition.at == failed_at
    assert transition.consecutive_failures == 6
    assert breaker.state is BreakerState.OPEN
    assert breaker.opened_at == failed_at
    assert breaker.seconds_until_half_open(failed_at) == 30.0

    refused, transition = breaker.admit(failed_at + 29.9)
    assert not refused.allowed
    assert transition is None
    assert breaker.poll(failed_at + 29.9) is None
    assert breaker.state is BreakerState.OPEN

    admission, transition = breaker.admit(failed_at + 30.0)
    assert transition is not None
    assert transition.to_state is BreakerState.HALF_OPEN
    assert admission.allowed
    assert admission.probe


def test_cancelled_probe_frees_the_slot_and_is_not_a_failure() -> None:
    breaker = half_open_breaker()
    probe, _ = breaker.admit(T0 + 30.0)
    generation = breaker.generation

    breaker.record_cancelled(probe)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.generation == generation
    assert breaker.consecutive_failures == 5

    second, _ = breaker.admit(T0 + 30.0)
    assert second == Admission(allowed=True, generation=generation, probe=True)
    third, _ = breaker.admit(T0 + 30.0)
    assert not third.allowed


def test_cancellation_in_closed_does_not_change_failure_count() -> None:
    breaker = CircuitBreaker()
    fail_times(breaker, 4)
    admission, _ = breaker.admit(T0)
    breaker.record_cancelled(admission)
    assert breaker.consecutive_failures == 4
    assert breaker.state is BreakerState.CLOSED
    assert breaker.generation == 0
    # The next failure is still the fifth consecutive one.
    [transition] = fail_times(breaker, 1)
    assert transition is not None
    assert transition.to_state is BreakerState.OPEN


# --------------------------------------------------------------------------- generations / stale results


def test_every_transition_increments_generation() -> None:
    breaker = CircuitBreaker(failure_threshold=1)
    generations = [breaker.generation]
    fail_times(breaker, 1)  # closed -> open
    generations.append(breaker.generation)
    probe, _ = breaker.admit(T0 + 30.0)  # open -> half_open
    generations.append(breaker.generation)
    breaker.record_failure(probe, T0 + 30.0)  # half_open -> open
    generations.append(breaker.generation)
    probe, _ = breaker.admit(T0 + 60.0)  # open -> half_open
    generations.append(breaker.generation)
    breaker.record_success(probe, T0 + 60.0)  # half_open -> closed
    generations.append(breaker.generation)
    assert generations == [0, 1, 2, 3, 4, 5]


def test_stale_failure_after_opening_causes_no_transition() -> None:
    breaker = CircuitBreaker()
    slow, _ = breaker.admit(T0)  # admitted while closed, generation 0
    fail_times(breaker, 5, T0 + 1.0)
    assert breaker.state is BreakerState.OPEN

    assert breaker.record_failure(slow, T0 + 10.0) is None
    assert breaker.state is BreakerState.OPEN
    assert breaker.consecutive_failures == 5
    assert breaker.generation == 1
    # The open period is still measured from the original opening, not the stale failure.
    assert breaker.opened_at == T0 + 1.0
    assert breaker.poll(T0 + 31.0) is not None


def test_stale_success_after_opening_causes_no_transition() -> None:
    breaker = CircuitBreaker()
    slow, _ = breaker.admit(T0)
    fail_times(breaker, 5, T0 + 1.0)

    assert breaker.record_success(slow, T0 + 10.0) is None
    assert breaker.state is BreakerState.OPEN
    assert breaker.consecutive_failures == 5
    assert breaker.generation == 1
    assert breaker.opened_at == T0 + 1.0


def test_stale_results_arriving_in_half_open_do_not_resolve_the_probe() -> None:
    breaker = CircuitBreaker()
    slow_ok, _ = breaker.admit(T0)
    slow_bad, _ = breaker.admit(T0)
    fail_times(breaker, 5)
    probe, _ = breaker.admit(T0 + 30.0)
    assert probe.probe

    assert breaker.record_success(slow_ok, T0 + 31.0) is None
    assert breaker.record_failure(slow_bad, T0 + 31.0) is None
    assert (breaker.state, breaker.consecutive_failures) == (BreakerState.HALF_OPEN, 5)
    # The real probe is still outstanding and still decides the outcome.
    refused, _ = breaker.admit(T0 + 31.0)
    assert not refused.allowed
    assert breaker.record_success(probe, T0 + 32.0) is not None
    assert breaker.state is BreakerState.CLOSED


def test_stale_cancellation_does_not_release_the_probe_slot() -> None:
    breaker = CircuitBreaker()
    slow, _ = breaker.admit(T0)
    fail_times(breaker, 5)
    probe, _ = breaker.admit(T0 + 30.0)
    assert probe.allowed

    breaker.record_cancelled(slow)
    refused, _ = breaker.admit(T0 + 30.0)
    assert not refused.allowed


def test_stale_closed_success_after_a_full_cycle_does_not_reset_new_failures() -> None:
    breaker = CircuitBreaker()
    slow, _ = breaker.admit(T0)  # generation 0
    fail_times(breaker, 5)
    probe, _ = breaker.admit(T0 + 30.0)
    breaker.record_success(probe, T0 + 30.0)  # closed again, generation 3
    fail_times(breaker, 3, T0 + 31.0)

    assert breaker.record_success(slow, T0 + 32.0) is None
    assert breaker.consecutive_failures == 3


@pytest.mark.parametrize("outcome", ["success", "failure", "cancelled"])
def test_results_for_a_refused_admission_raise_value_error(outcome: str) -> None:
    breaker = opened_breaker()
    refused, _ = breaker.admit(T0 + 1.0)
    assert not refused.allowed
    with pytest.raises(ValueError, match="refused"):
        report(breaker, refused, outcome, T0 + 2.0)
    assert breaker.state is BreakerState.OPEN
    assert breaker.consecutive_failures == 5
    assert breaker.generation == 1


def test_refused_admission_from_an_older_generation_still_raises() -> None:
    breaker = opened_breaker()
    refused, _ = breaker.admit(T0 + 1.0)
    breaker.poll(T0 + 30.0)
    with pytest.raises(ValueError, match="refused"):
        breaker.record_failure(refused, T0 + 31.0)


# --------------------------------------------------------------------------- stateful model check

Outcome = Literal["success", "failure", "cancelled"]
ModelTransition = tuple[str, str, float, int]


@dataclass
class ReferenceBreaker:
    """A deliberately naive re-statement of the breaker contract, used as a test oracle.

    It identifies the half-open probe by a ticket number rather than by generation bookkeeping,
    and records transitions as plain tuples.
    """

    threshold: int
    reset: float = 30.0
    state: str = "closed"
    failures: int = 0
    generation: int = 0
    opened: float | None = None
    probe_ticket: int | None = None  # ticket of the live half-open probe, if any
    tickets_issued: int = 0
    log: list[ModelTransition] = field(default_factory=list)

    def _go(self, new_state: str, now: float) -> ModelTransition:
        step = (self.state, new_state, now, self.failures)
        self.state = new_state
        self.generation += 1
        self.log.append(step)
        return step

    def poll(self, now: float) -> ModelTransition | None:
        if self.state == "open":
            assert self.opened is not None
            if now >= self.opened + self.reset:
                self.probe_ticket = None
                return self._go("half_open", now)
        return None

    def admit(self, now: float) -> tuple[bool, int, bool, int, ModelTransition | None]:
        """Returns (allowed, generation, probe, ticket, transition)."""
        step = self.poll(now)
        self.tickets_issued += 1
        ticket = self.tickets_issued
        if self.state == "closed":
            return True, self.generation, False, ticket, step
        if self.state == "half_open" and self.probe_ticket is None:
            self.probe_ticket = ticket
            return True, self.generation, True, ticket, step
        return False, self.generation, False, ticket, step

    def resolve(self, generation: int, ticket: int, outcome: Outcome, now: float) -> ModelTransition | None:
        if generation != self.generation:
            return None  # stale
        if self.state == "closed":
            if outcome == "success":
                self.failures = 0
            elif outcome == "failure":
                self.failures += 1
                if self.failures == self.threshold:
                    self.opened = now
                    return self._go("open", now)
            return None
        if self.state == "half_open" and ticket == self.probe_ticket:
            self.probe_ticket = None
            if outcome == "success":
                self.failures = 0
                self.opened = None
                return self._go("closed", now)
            if outcome == "failure":
                self.failures += 1
                self.opened = now
                return self._go("open", now)
        return None

    def seconds_left(self, now: float) -> float:
        if self.state != "open":
            return 0.0
        assert self.opened is not None
        return max(0.0, self.opened + self.reset - now)


def as_tuple(transition: Transition | None) -> ModelTransition | None:
    if transition is None:
        return None
    return (
        transition.from_state.value,
        transition.to_state.value,
        transition.at,
        transition.consecutive_failures,
    )


@dataclass(frozen=True)
class Outstanding:
    admission: Admission
    ticket: int


class BreakerVersusModel(RuleBasedStateMachine):
    """Drives the real breaker and the reference model with the same random call sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.breaker = CircuitBreaker()
        self.model = ReferenceBreaker(threshold=5)
        self.outstanding: list[Outstanding] = []
        self.refused: Admission | None = None

    @initialize(threshold=st.sampled_from([5, 5, 1, 2, 3]))
    def configure(self, threshold: int) -> None:
        self.breaker = CircuitBreaker(failure_threshold=threshold, reset_seconds=30.0)
        self.model = ReferenceBreaker(threshold=threshold, reset=30.0)

    @rule(
        dt=st.one_of(
            st.just(30.0),
            st.sampled_from([0.0, 0.1, 29.9, 30.0]),
            st.floats(min_value=0.0, max_value=60.0, allow_nan=False, allow_infinity=False),
        )
    )
    def advance_clock(self, dt: float) -> None:
        self.now += dt

    @rule()
    def poll(self) -> None:
        assert as_tuple(self.breaker.poll(self.now)) == self.model.poll(self.now)

    @rule()
    def admit(self) -> None:
        admission, transition = self.breaker.admit(self.now)
        allowed, generation, probe, ticket, expected = self.model.admit(self.now)
        assert (admission.allowed, admission.generation, admission.probe) == (allowed, generation, probe)
        assert as_tuple(transition) == expected
        if admission.allowed:
            self.outstanding.append(Outstanding(admission, ticket))
        else:
            self.refused = admission

    @rule(outcome=st.sampled_from(["failure", "success", "cancelled"]))
    def attempt_write_and_resolve_at_once(self, outcome: Outcome) -> None:
        """The writer's common path: admit, write, report, with no other call in between."""
        before = len(self.outstanding)
        self.admit()
        if len(self.outstanding) > before:  # admitted: resolve exactly that admission
            self.resolve(before, outcome)

    @precondition(lambda self: bool(self.outstanding))
    @rule(
        pick=st.integers(min_value=0, max_value=1_000),
        outcome=st.sampled_from(["failure", "success", "cancelled"]),
    )
    def resolve(self, pick: int, outcome: Outcome) -> None:
        item = self.outstanding.pop(pick % len(self.outstanding))
        expected = self.model.resolve(item.admission.generation, item.ticket, outcome, self.now)
        assert as_tuple(report(self.breaker, item.admission, outcome, self.now)) == expected

    @precondition(lambda self: self.refused is not None)
    @rule(outcome=st.sampled_from(["success", "failure", "cancelled"]))
    def resolving_a_refused_admission_raises(self, outcome: Outcome) -> None:
        assert self.refused is not None
        with pytest.raises(ValueError, match="refused"):
            report(self.breaker, self.refused, outcome, self.now)

    @invariant()
    def states_agree(self) -> None:
        assert self.breaker.state.value == self.model.state
        assert self.breaker.generation == self.model.generation
        assert self.breaker.opened_at == self.model.opened

    @invariant()
    def consecutive_failure_counts_agree(self) -> None:
        assert self.breaker.consecutive_failures == self.model.failures

    @invariant()
    def seconds_until_half_open_agrees(self) -> None:
        assert self.breaker.seconds_until_half_open(self.now) == self.model.seconds_left(self.now)

    @invariant()
    def at_most_one_outstanding_probe_in_half_open(self) -> None:
        live_probes = [
            o for o in self.outstanding if o.admission.probe and o.admission.generation == self.breaker.generation
        ]
        if self.breaker.state is BreakerState.HALF_OPEN:
            assert len(live_probes) <= 1
        else:
            assert live_probes == []


BreakerVersusModel.TestCase.settings = settings(max_examples=examples(200), stateful_step_count=50, deadline=None)
TestBreakerVersusModel = BreakerVersusModel.TestCase
