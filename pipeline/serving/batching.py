"""Server-side batching: the instances of concurrent requests run in one model call.

TensorFlow Serving's batching, with its knobs (`max_batch_size`, `batch_timeout_micros`,
`num_batch_threads`): a request's instances wait in a queue; a batch thread takes the
oldest request, then adds later requests of the same kind (signature) while they fit in
`max_batch_size` instances, until the batch is full or `batch_timeout` has passed since
the oldest request arrived. One model call then runs the whole batch, and each request
gets back exactly the results of its own instances, in order.

A request is never split across calls: one with more instances than `max_batch_size`
runs alone. If the model refuses a batch of several requests (one holds an image that
passes the header check but does not decode), each request of the batch is run on its
own, so only the bad one fails. `max_batch_size=1` turns batching off: every request is
its own call, in arrival order.

The model runs in the batch threads, never in the caller's: callers get a
`concurrent.futures.Future` (an asyncio server awaits it with `asyncio.wrap_future`).
One batch fills at a time: while a thread's batch waits for more requests, the other
threads do not start one (they would take the requests that belong to it); they start
the next batch once that one is closed, and run it while the first one's call runs.
"""

import collections
import concurrent.futures
import dataclasses
import threading
import time


@dataclasses.dataclass
class _Task:
    key: str  # requests batch together only with requests of the same key
    items: list
    future: concurrent.futures.Future
    arrived: float  # time.monotonic()


class Batcher:
    """Queues requests and runs them in batches on `num_threads` threads.

    Args:
      run_batch: run_batch(key: str, items: list) -> list of results, one per item, in
        order; it may raise, which fails the requests of that call.
      max_batch_size: int >= 1, most instances in one call (a larger request runs alone).
      timeout_s: float >= 0, longest a batch waits for more requests after its oldest one
        arrived.
      num_threads: int >= 1, batches that may run at once.
      on_call: optional on_call(key, size), told the size of every model call (metrics).
    """

    def __init__(self, run_batch, max_batch_size, timeout_s, num_threads, on_call=None):
        if max_batch_size < 1 or num_threads < 1 or timeout_s < 0:
            raise ValueError(f"bad batching settings: max_batch_size={max_batch_size}, "
                             f"timeout_s={timeout_s}, num_threads={num_threads}")
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self._run_batch = run_batch
        self._on_call = on_call
        self._queue = collections.deque()
        self._condition = threading.Condition()
        self._closing = False
        self._filling = False  # a thread's batch is open and waiting for more requests
        self._threads = [threading.Thread(target=self._work, name=f"batch-{index}", daemon=True)
                         for index in range(num_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, key, items):
        """Queues `items` (non-empty list) of kind `key`; returns a Future of their results (list)."""
        future = concurrent.futures.Future()
        with self._condition:
            if self._closing:
                raise RuntimeError("the batcher is closed")
            self._queue.append(_Task(key, list(items), future, time.monotonic()))
            # All: the thread filling a batch must see it, whichever thread notify() would pick.
            self._condition.notify_all()
        return future

    def close(self):
        """Runs what is queued, then stops the threads; returns when they have ended."""
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        for thread in self._threads:
            thread.join()

    def _work(self):
        while True:
            with self._condition:
                while (not self._queue or self._filling) and not self._closing:
                    self._condition.wait()
                if not self._queue:
                    return  # closing, nothing left
                self._filling = True
                try:
                    batch = self._gather()
                finally:
                    self._filling = False
                    self._condition.notify_all()  # what is left may start the next batch
            self._run(batch)

    def _gather(self):
        """Takes the oldest task and what may join it (called holding the lock; may wait on it)."""
        first = self._queue.popleft()
        batch, size = [first], len(first.items)
        deadline = first.arrived + self.timeout_s
        while size < self.max_batch_size:
            full = False
            for task in list(self._queue):
                if task.key != first.key:
                    continue
                if size + len(task.items) > self.max_batch_size:
                    full = True  # the next one waits for the next batch: this one is done
                    break
                self._queue.remove(task)
                batch.append(task)
                size += len(task.items)
            remaining = deadline - time.monotonic()
            if full or size >= self.max_batch_size or self._closing or remaining <= 0:
                break
            self._condition.wait(remaining)
        return batch

    def _run(self, batch):
        items = [item for task in batch for item in task.items]
        try:
            results = self._call(batch[0].key, items)
        except Exception as error:  # noqa: BLE001 - handed to the waiting requests, not lost
            if len(batch) == 1:
                batch[0].future.set_exception(error)
                return
            for task in batch:  # one request's bad instance must not fail the others
                self._run([task])
            return
        start = 0
        for task in batch:
            task.future.set_result(results[start:start + len(task.items)])
            start += len(task.items)

    def _call(self, key, items):
        if self._on_call is not None:
            self._on_call(key, len(items))
        results = list(self._run_batch(key, items))
        if len(results) != len(items):
            raise AssertionError(f"run_batch returned {len(results)} results for {len(items)} items")
        return results
