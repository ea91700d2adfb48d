"""`StopSignal` with real signals sent to this process: a flag only, duplicates absorbed, a signal during a
save aborts it, the previous handlers come back; the test-only poison variable is checked."""

from __future__ import annotations

import os
import signal

import pytest

from apr_format.errors import AprError
from apr_trainer.guards import NonFiniteGuard, SaveAborted, StopSignal, TooManySkippedSteps, poisoned_steps


def test_signals_set_a_flag_and_one_during_a_save_aborts_it():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    stop = StopSignal()
    with stop.installed():
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a forwarded duplicate while the step finishes: absorbed
        assert stop.name == "SIGUSR1" and stop.local_flag == 1.0
        with pytest.raises(SaveAborted) as aborted, stop.saving():
            os.kill(os.getpid(), signal.SIGINT)
        assert aborted.value.signum == signal.SIGINT
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_signal_during_a_save_before_any_stop_only_asks_to_stop():
    stop = StopSignal()
    with stop.installed(), stop.saving():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.name == "SIGTERM"


def test_guard_stops_after_max_consecutive_skips_only():
    guard = NonFiniteGuard(2)
    guard.check(1, False, None)
    guard.check(2, True, None)  # a finite step resets the count
    guard.check(3, False, None)
    with pytest.raises(TooManySkippedSteps, match=r"^--max-skipped-steps: 2 consecutive steps \(up to step 4\)"):
        guard.check(4, False, "run/checkpoints/step-000002.apr")


def test_poison_variable_is_parsed_or_refused(monkeypatch):
    monkeypatch.setenv("APR_TEST_POISON_STEPS", "3, 5")
    assert poisoned_steps() == {3, 5}
    monkeypatch.setenv("APR_TEST_POISON_STEPS", "three")
    with pytest.raises(AprError, match="^APR_TEST_POISON_STEPS: test-only"):
        poisoned_steps()
