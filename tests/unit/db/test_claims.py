"""Claims renewed while steps run: one thread renews every running step's claim, each every
third of its lease, and none once its step has ended."""

import threading
import time

from visitas.db.claims import Renewals


class RecordingClaims:
    def __init__(self, lease: float):
        self.lease = lease
        self.renewed: list[tuple[str, float]] = []

    def renew(self, file_name: str) -> None:
        self.renewed.append((file_name, time.monotonic()))


def _wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.01)


def test_each_running_step_is_renewed_and_an_ended_one_never_again():
    renewals = Renewals()
    claims = RecordingClaims(lease=0.3)  # renewed every 0.1 s
    with renewals.holding(claims, "report_1.txt"):
        with renewals.holding(claims, "report_2.txt"):
            _wait_for(lambda: {name for name, _ in claims.renewed} == {"report_1.txt",
                                                                      "report_2.txt"})
        ended = time.monotonic()
        _wait_for(lambda: sum(name == "report_1.txt" for name, _ in claims.renewed) >= 3)
    assert all(at <= ended for name, at in claims.renewed if name == "report_2.txt")
    stopped = len(claims.renewed)
    time.sleep(0.5)  # five periods: nothing is running, nothing is renewed
    assert len(claims.renewed) == stopped


def test_a_renewal_that_fails_is_logged_and_tried_again(caplog):
    class Failing(RecordingClaims):
        def renew(self, file_name):
            super().renew(file_name)
            raise ConnectionError("the database is down")

    renewals, claims = Renewals(), Failing(lease=0.3)
    with renewals.holding(claims, "report_1.txt"):
        _wait_for(lambda: len(claims.renewed) >= 2)
    assert "could not renew the claim on report_1.txt: the database is down" in caplog.text


def test_one_thread_serves_every_step():
    renewals = Renewals()
    before = threading.active_count()
    for n in range(20):
        with renewals.holding(RecordingClaims(lease=3600), f"report_{n}.txt"):
            pass
    assert threading.active_count() <= before + 1
