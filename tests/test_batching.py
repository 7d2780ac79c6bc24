"""pipeline.serving.batching.Batcher with a plain Python batch function (the live server's batching is in test_serve.py)."""

import threading
import time

import pytest

from pipeline.serving import batching


class Recorder:
    """A batch function that squares numbers, refuses a batch holding a negative one, and records its calls."""

    def __init__(self, release=None):
        self.calls = []  # (key, items)
        self.lock = threading.Lock()
        self.release = release  # an Event the first call waits for, so requests pile up behind it
        self.entered = threading.Event()

    def __call__(self, key, items):
        self.entered.set()
        if self.release is not None:
            self.release.wait(10)
        with self.lock:
            self.calls.append((key, list(items)))
        if any(item < 0 for item in items):
            raise ValueError(f"negative item in {items}")
        return [(key, item * item) for item in items]


def test_queued_requests_share_calls_within_the_size_and_get_their_own_results():
    release = threading.Event()
    recorder = Recorder(release)
    batcher = batching.Batcher(recorder, max_batch_size=4, timeout_s=0.0, num_threads=1)
    try:
        blocker = batcher.submit("a", [100])  # occupies the only thread until released
        assert recorder.entered.wait(10)
        requests = [("a", [1, 2]), ("b", [3]), ("a", [4]), ("a", [5, 6, 7]), ("a", [8, 9, 10, 11, 12]), ("b", [13])]
        futures = [batcher.submit(key, items) for key, items in requests]
        release.set()
        results = [future.result(10) for future in futures]
        assert blocker.result(10) == [("a", 10000)]
    finally:
        batcher.close()
    assert results == [[(key, item * item) for item in items] for key, items in requests]
    calls = recorder.calls[1:]
    assert all(len(items) <= 4 for key, items in calls if items != [8, 9, 10, 11, 12])  # a larger one runs alone
    assert ("a", [8, 9, 10, 11, 12]) in calls
    assert ("a", [1, 2, 4]) in calls and ("b", [3, 13]) in calls  # same key joined, in arrival order
    assert len(calls) == 4


def test_a_refused_batch_is_retried_per_request_so_only_the_bad_one_fails():
    release = threading.Event()
    recorder = Recorder(release)
    sizes = []
    batcher = batching.Batcher(recorder, max_batch_size=16, timeout_s=0.0, num_threads=1,
                               on_call=lambda key, size: sizes.append(size))
    try:
        batcher.submit("a", [0])
        assert recorder.entered.wait(10)
        good, bad, other = batcher.submit("a", [1, 2]), batcher.submit("a", [3, -1]), batcher.submit("a", [4])
        release.set()
        assert good.result(10) == [("a", 1), ("a", 4)]
        assert other.result(10) == [("a", 16)]
        with pytest.raises(ValueError, match="negative item"):
            bad.result(10)
    finally:
        batcher.close()
    assert sizes == [1, 5, 2, 2, 1]  # the blocker, the refused batch, then each request alone


def test_timeout_waits_for_a_later_request_and_close_runs_what_is_queued():
    recorder = Recorder()
    batcher = batching.Batcher(recorder, max_batch_size=8, timeout_s=5.0, num_threads=1)
    first = batcher.submit("a", [1])
    second = batcher.submit("a", [2])  # arrives within the first one's timeout: one call
    batcher.close()  # does not wait out the timeout: closing runs the batch now
    assert first.result(0) == [("a", 1)] and second.result(0) == [("a", 4)]
    assert recorder.calls == [("a", [1, 2])]
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("a", [3])


def test_bad_settings_are_refused():
    for settings in ({"max_batch_size": 0}, {"timeout_s": -1.0}, {"num_threads": 0}):
        arguments = {"max_batch_size": 4, "timeout_s": 0.0, "num_threads": 1, **settings}
        with pytest.raises(ValueError, match="bad batching settings"):
            batching.Batcher(Recorder(), **arguments)


def test_with_several_threads_requests_join_the_batch_that_is_filling():
    # While one thread's batch waits out its timeout, the idle thread must not start a batch
    # of its own with the next request: that request belongs to the open batch.
    recorder = Recorder()
    batcher = batching.Batcher(recorder, max_batch_size=8, timeout_s=0.5, num_threads=2)
    try:
        futures = []
        for item in range(4):
            futures.append(batcher.submit("a", [item]))
            time.sleep(0.02)  # later requests, well within the first one's timeout
        assert [future.result(10) for future in futures] == [[("a", item * item)] for item in range(4)]
    finally:
        batcher.close()
    assert recorder.calls == [("a", [0, 1, 2, 3])]
