"""When the standalone server starts again a receiving process that ended (ingest/receivers.py)."""

from __future__ import annotations

from orthanc_cbir.ingest.receivers import MAX_RESTART_DELAY_S, STABLE_S, restart_delay


def test_a_receiving_process_that_keeps_ending_waits_twice_as_long_each_time_up_to_a_minute():
    delays, delay = [], 0.0
    for _ in range(9):
        delay = restart_delay(0.5, delay)  # ends half a second after each start
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, MAX_RESTART_DELAY_S, MAX_RESTART_DELAY_S, MAX_RESTART_DELAY_S]


def test_a_receiving_process_that_ran_its_minute_is_started_again_at_once_whatever_it_waited_before():
    assert restart_delay(STABLE_S, MAX_RESTART_DELAY_S) == 0.0
    assert restart_delay(STABLE_S - 1, 0.0) == 1.0
