"""Pure circuit-breaker state machine guarding the background database writer.

This module decides, and only decides, whether a write attempt may go ahead. It tracks consecutive
write failures, opens the circuit after ``failure_threshold`` of them, lets a single probe through
once ``reset_seconds`` have passed, and closes again when that probe succeeds. It never reads a
clock, sleeps, awaits, logs or touches the database: the caller passes the current monotonic time
into every time-dependent method and receives :class:`Admission` decisions and :class:`Transition`
records back, which it is responsible for acting on (sleeping, writing, publishing events and
metrics). Every transition bumps a generation counter; results reported for an admission granted in
an older generation are stale and are ignored, so a slow write that finishes after the breaker has
moved on cannot disturb the new state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from persistence.errors import BreakerAdmissionError, ConfigurationError

__all__ = ["Admission", "BreakerState", "CircuitBreaker", "Transition", "Verdict", "verdict_of"]


class BreakerState(enum.StrEnum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    """Writes flow normally; consecutive failures are counted."""
    OPEN = "open"
    """Writes are refused until the reset period has elapsed."""
    HALF_OPEN = "half_open"
    """A single probe write is allowed to test whether the database has recovered."""


class Verdict(enum.StrEnum):
    """What one attempt's outcome means to the breaker."""

    SUCCESS = "success"
    """The database took the attempt: resets the failure count, closes a half-open circuit."""
    FAILURE = "failure"
    """The database failed it (after the retries): one failure."""
    NEITHER = "neither"
    """The database answered, but only with data errors: neither trips nor resets the breaker."""


def verdict_of(*, failed: bool, data_errors: bool) -> Verdict:
    """The outcome -> breaker mapping: a transient failure left after the retries counts once, whatever else the batch
    did; a batch that met data errors (dead-lettered or lost records) and no failure counts neither way; a clean
    batch is a success."""
    if failed:
        return Verdict.FAILURE
    return Verdict.NEITHER if data_errors else Verdict.SUCCESS


@dataclass(frozen=True, slots=True)
class Admission:
    """The breaker's answer to "may I attempt a write now?".

    Hand the same object back to exactly one of :meth:`CircuitBreaker.record_success`,
    :meth:`CircuitBreaker.record_failure` or :meth:`CircuitBreaker.record_cancelled` once the
    attempt is over (only when ``allowed`` is true).
    """

    allowed: bool
    """Whether the caller may attempt the write."""
    generation: int
    """The breaker generation in which this decision was made."""
    probe: bool
    """True when this admission is the single half-open probe."""


@dataclass(frozen=True, slots=True)
class Transition:
    """A record of one state change, returned to the caller for events and metrics."""

    from_state: BreakerState
    to_state: BreakerState
    at: float
    """The ``now`` value that caused the transition."""
    consecutive_failures: int
    """The consecutive failure count once the event causing the transition was applied."""


class CircuitBreaker:
    """Circuit breaker driven entirely by caller-supplied monotonic timestamps.

    * closed -> open after ``failure_threshold`` consecutive failed attempts; a success in closed
      resets the count to zero.
    * open -> half_open once ``reset_seconds`` have passed since opening; checked lazily by
      :meth:`poll` and :meth:`admit`.
    * half_open admits exactly one outstanding probe. Probe success -> closed (count zero); probe
      failure -> open for another full ``reset_seconds`` counted from the failure time.
    * Cancellation is not a failure: it only frees the half-open probe slot.
    * Results for admissions from an older generation are ignored entirely.

    The consecutive failure count keeps counting while open and half-open (a failed probe adds
    one) and is reset to zero only by a success.
    """

    __slots__ = (
        "_consecutive_failures",
        "_failure_threshold",
        "_generation",
        "_half_open_at",
        "_opened_at",
        "_probe_outstanding",
        "_reset_seconds",
        "_state",
    )

    def __init__(self, failure_threshold: int = 5, reset_seconds: float = 30.0) -> None:
        """Create a closed breaker.

        Raises:
            ConfigurationError: if ``failure_threshold`` < 1 or ``reset_seconds`` <= 0.
        """
        if failure_threshold < 1:
            raise ConfigurationError([("failure_threshold", f"must be >= 1, got {failure_threshold!r}")])
        if not reset_seconds > 0:  # also rejects NaN
            raise ConfigurationError([("reset_seconds", f"must be > 0, got {reset_seconds!r}")])
        self._failure_threshold = failure_threshold
        self._reset_seconds = float(reset_seconds)
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._consecutive_failures = 0
        self._opened_at: float | None = None
        self._half_open_at: float | None = None
        self._probe_outstanding = False

    # ------------------------------------------------------------------ read-only views

    @property
    def failure_threshold(self) -> int:
        """Consecutive failures that open the circuit."""
        return self._failure_threshold

    @property
    def reset_seconds(self) -> float:
        """Seconds the circuit stays open before a probe is allowed."""
        return self._reset_seconds

    @property
    def state(self) -> BreakerState:
        """The state as last evaluated; does not check whether an open period has elapsed."""
        return self._state

    @property
    def generation(self) -> int:
        """Incremented on every transition; tags admissions so stale results can be ignored."""
        return self._generation

    @property
    def consecutive_failures(self) -> int:
        """Failed attempts since the last success."""
        return self._consecutive_failures

    @property
    def opened_at(self) -> float | None:
        """When the circuit last opened (kept through half_open); ``None`` while closed."""
        return self._opened_at

    # ------------------------------------------------------------------ time-driven

    def poll(self, now: float) -> Transition | None:
        """Move open -> half_open if the reset period has elapsed at ``now``; else return None."""
        if self._state is BreakerState.OPEN and self._half_open_at is not None and now >= self._half_open_at:
            self._probe_outstanding = False
            return self._transition(BreakerState.HALF_OPEN, now)
        return None

    def seconds_until_half_open(self, now: float) -> float:
        """Remaining open time at ``now`` (never negative); 0.0 unless the state is open."""
        if self._state is not BreakerState.OPEN or self._half_open_at is None:
            return 0.0
        return max(0.0, self._half_open_at - now)

    def admit(self, now: float) -> tuple[Admission, Transition | None]:
        """Decide whether a write attempt may start at ``now``.

        Returns the admission and, if this call moved the breaker from open to half_open, that
        transition (otherwise None).
        """
        transition = self.poll(now)
        if self._state is BreakerState.CLOSED:
            admission = Admission(allowed=True, generation=self._generation, probe=False)
        elif self._state is BreakerState.HALF_OPEN and not self._probe_outstanding:
            self._probe_outstanding = True
            admission = Admission(allowed=True, generation=self._generation, probe=True)
        else:
            admission = Admission(allowed=False, generation=self._generation, probe=False)
        return admission, transition

    # ------------------------------------------------------------------ results

    def record_success(self, admission: Admission, now: float) -> Transition | None:
        """Report that an admitted attempt succeeded.

        In closed this resets the failure count; for the half-open probe it closes the circuit.
        Stale admissions are ignored.

        Raises:
            BreakerAdmissionError: if ``admission`` was refused.
        """
        if not self._is_current(admission):
            return None
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            return None
        # Current half-open probe.
        self._probe_outstanding = False
        self._consecutive_failures = 0
        self._opened_at = None
        self._half_open_at = None
        return self._transition(BreakerState.CLOSED, now)

    def record_failure(self, admission: Admission, now: float) -> Transition | None:
        """Report that an admitted attempt failed.

        In closed this counts towards the threshold and may open the circuit; for the half-open
        probe it reopens the circuit for a full reset period from ``now``. Stale admissions are
        ignored.

        Raises:
            BreakerAdmissionError: if ``admission`` was refused.
        """
        if not self._is_current(admission):
            return None
        self._consecutive_failures += 1
        if self._state is BreakerState.CLOSED and self._consecutive_failures < self._failure_threshold:
            return None
        # Either the threshold was reached in closed, or the half-open probe failed.
        self._probe_outstanding = False
        self._opened_at = now
        self._half_open_at = now + self._reset_seconds
        return self._transition(BreakerState.OPEN, now)

    def record(self, admission: Admission, verdict: Verdict, now: float) -> Transition | None:
        """Report an admitted attempt's :class:`Verdict`: a success, a failure, or neither (as if cancelled)."""
        if verdict is Verdict.SUCCESS:
            return self.record_success(admission, now)
        if verdict is Verdict.FAILURE:
            return self.record_failure(admission, now)
        self.record_cancelled(admission)
        return None

    def record_cancelled(self, admission: Admission) -> None:
        """Report that an admitted attempt was cancelled before it produced a result.

        Not a failure: no transition and no change to the failure count. A cancelled half-open
        probe frees the probe slot so another probe may be admitted. Stale admissions are ignored.

        Raises:
            BreakerAdmissionError: if ``admission`` was refused.
        """
        if self._is_current(admission) and self._state is BreakerState.HALF_OPEN:
            self._probe_outstanding = False

    # ------------------------------------------------------------------ internals

    def _is_current(self, admission: Admission) -> bool:
        """Validate ``admission`` and say whether its result should be applied.

        Only closed-state admissions and the outstanding half-open probe of the current generation
        are applied; anything else (older generation, or a probe whose slot was already released)
        is ignored.
        """
        if not admission.allowed:
            raise BreakerAdmissionError(self._state.value, admission.generation)
        if admission.generation != self._generation:
            return False
        if self._state is BreakerState.CLOSED:
            return not admission.probe
        if self._state is BreakerState.HALF_OPEN:
            return admission.probe and self._probe_outstanding
        return False

    def _transition(self, to_state: BreakerState, now: float) -> Transition:
        transition = Transition(
            from_state=self._state,
            to_state=to_state,
            at=now,
            consecutive_failures=self._consecutive_failures,
        )
        self._state = to_state
        self._generation += 1
        return transition

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker(state={self._state.value!r}, generation={self._generation}, "
            f"consecutive_failures={self._consecutive_failures}/{self._failure_threshold}, "
            f"opened_at={self._opened_at!r})"
        )
