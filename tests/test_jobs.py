"""Job leases: one holder at a time, renewal by the holder, take-over after expiry."""
from __future__ import annotations

from server.jobs import JobScheduler, Leases


class _Job:
    name = "count"

    def __init__(self):
        self.runs = 0
        self.skips = 0

    def wait(self, now):
        return 0

    def run(self, should_stop):
        self.runs += 1
        return self.runs

    def skipped(self):
        self.skips += 1


def test_one_holder_renewal_and_take_over_after_expiry(tmp_path):
    now = [1000.0]
    a = Leases(tmp_path / "c.sqlite", holder="a", ttl=60, clock=lambda: now[0])
    b = Leases(tmp_path / "c.sqlite", holder="b", ttl=60, clock=lambda: now[0])
    assert a.acquire("j") and not b.acquire("j")
    now[0] += 50
    assert a.acquire("j")                 # renewed by its holder
    now[0] += 50
    assert not b.acquire("j")             # still within the renewed lease
    assert b.holder_of("j") == "a"
    now[0] += 61                          # the holder died: the lease runs out
    assert b.acquire("j") and not a.acquire("j")
    b.release("j")
    assert a.acquire("j")
    a.close()
    b.close()


def test_two_schedulers_one_run(tmp_path):
    """Two replicas schedule the same job at the same time: it runs once."""
    db = tmp_path / "c.sqlite"
    ja, jb = _Job(), _Job()
    held = Leases(db, holder="a")
    sa = JobScheduler([ja], leases=held)
    sb = JobScheduler([jb], leases=Leases(db, holder="b"))
    # a is inside its run when b looks: b skips
    ja.run = lambda stop: (sb.step(), 1)[1]
    assert sa.step() == {"count": 1}
    assert (jb.runs, jb.skips) == (0, 1)
    assert sb.step() == {"count": 1}      # free again once a released it
    sa.stop()
    sb.stop()
