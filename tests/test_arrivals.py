"""Replies are pulled and handed on one at a time as they arrive (fedapp.server.rounds)."""

from flwr.app import Message, MetricRecord, RecordDict

from fedapp.server import rounds
from fedapp.server.rounds import Waiting, replies_as_they_arrive
from tests.flower_messages import instruction


class SlowGrid:
    """A grid whose node i answers after ``delays[i]`` pulls; records every pull request."""

    def __init__(self, delays, unpushable=()):
        self.delays, self.unpushable = delays, set(unpushable)
        self.pulls: list[list[str]] = []
        self.sent: dict[str, Message] = {}
        self.handed_out: list[str] = []

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            if i in self.unpushable:
                ids.append(None)
                continue
            msg.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent[f"m{i}"] = msg
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids):
        self.pulls.append(list(ids))
        out = []
        for message_id in ids:
            index = int(message_id[1:])
            if len(self.pulls) > self.delays[index]:
                self.handed_out.append(message_id)
                content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
                out.append(Message(content=content, reply_to=self.sent.pop(message_id)))
        return out


def test_replies_come_one_at_a_time_as_they_arrive(monkeypatch):
    monkeypatch.setattr(rounds, "FIRST_POLL_S", 0.001)
    grid = SlowGrid(delays=[0, 5, 2])
    waiting = Waiting()
    arrivals = replies_as_they_arrive(grid, [instruction(n, {}) for n in (1, 2, 3)], 10.0, waiting)
    first = next(arrivals)
    # The first reply is handed on before the others were asked for a second time or pulled.
    assert first.metadata.reply_to_message_id == "m0" and grid.handed_out == ["m0"]
    rest = [m.metadata.reply_to_message_id for m in arrivals]
    assert rest == ["m2", "m1"]  # in order of arrival, not of sending
    assert all(len(p) <= rounds.PULL_BATCH for p in grid.pulls)  # at most PULL_BATCH replies per pull
    assert waiting.seconds > 0


def test_the_timeout_ends_the_wait_and_unpushed_messages_are_not_waited_for(monkeypatch):
    monkeypatch.setattr(rounds, "FIRST_POLL_S", 0.01)
    grid = SlowGrid(delays=[0, 10**9, 0], unpushable={2})
    got = list(replies_as_they_arrive(grid, [instruction(n, {}) for n in (1, 2, 3)], 0.2, Waiting()))
    assert [m.metadata.reply_to_message_id for m in got] == ["m0"]  # m1 never came, m2 was never sent
    assert all("m2" not in p for p in grid.pulls)
    assert sum(1 for p in grid.pulls if "m1" in p) > 1  # asked for again until the timeout
