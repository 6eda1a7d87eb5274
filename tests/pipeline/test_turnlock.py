"""FineTuner's model lock (pipeline/actors.py: TurnLock): calls hold the model in the
order they arrived, and one that fails before its turn gives the turn up."""

from __future__ import annotations

import threading
import time

from pipeline.actors import TurnLock


def test_turns_follow_arrival_and_a_call_that_left_is_skipped():
    lock = TurnLock()
    tickets = [lock.draw() for _ in range(4)]
    assert tickets == [0, 1, 2, 3]
    held: list[int] = []

    def use(ticket: int) -> None:
        with lock.turn(ticket):
            held.append(ticket)
            time.sleep(0.05)

    threads = [threading.Thread(target=use, args=(t,)) for t in (3, 2, 0)]  # late first
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    lock.leave(1)  # failed reading its photos: never takes the lock
    lock.leave(1)  # idempotent
    for thread in threads:
        thread.join(timeout=10)
    assert held == [0, 2, 3]
    assert lock.draw() == 4
    with lock.turn(4, hold_s=0.1):  # the hang hook sleeps holding the turn
        pass
    start = time.perf_counter()
    with lock.turn(5, hold_s=0.0):  # the turn has moved on: no wait
        pass
    assert time.perf_counter() - start < 1.0
