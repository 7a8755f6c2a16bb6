"""runtime/preempt.py without a process group (one rank): the answers a multi-rank reduction gives,
with the same one-poll delay for the background-save flag."""
import os
import signal

from mimscale.runtime.preempt import StopRequest


def test_busy_is_reported_idle_one_poll_later_as_the_reduction_does():
    s = StopRequest()
    assert s.poll(busy=True) == (False, False, True)  # nothing was busy before the first poll
    assert s.poll(busy=False) == (False, False, False)  # the previous poll was busy
    assert s.poll(busy=False) == (False, False, True)


def test_a_signal_and_a_due_save_are_answered():
    s = StopRequest()
    s.install()
    try:
        assert s.poll(save_due=True)[:2] == (False, True)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.poll()[0] and s.signal_name == "SIGUSR1"
    finally:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
