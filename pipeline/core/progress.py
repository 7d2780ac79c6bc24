"""A small progress reporter for long loops: done/total, items per second and ETA on stderr.

On a terminal one line is rewritten in place (carriage return); in a log file (CI, nohup)
a full line is printed every `interval` seconds so logs stay readable.
"""

import sys
import time


def format_duration(seconds):
    """Seconds -> "1h02m", "3m05s" or "42s"; "?" when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


class Progress:
    """Reports progress of `total` items; call `update(count)` as items finish, then `close()`.

    The rate is measured from the first `update`, not from construction, so set-up work
    (building a model, tracing a function) does not distort items/s or the ETA.

        progress = Progress(total=len(items), label="extract", unit="images")
        for batch in batches:
            ...
            progress.update(len(batch))
        progress.close()
    """

    def __init__(self, total, label="", unit="items", stream=None, interval=None, clock=time.monotonic):
        self.total = int(total)
        self.label = label
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        is_terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.in_place = is_terminal
        self.interval = interval if interval is not None else (0.2 if is_terminal else 5.0)
        self.clock = clock
        self.done = 0
        self.started = clock()
        self.first_update = None
        self.done_at_first_update = 0
        self.last_report = None
        self.closed = False
        self._width = 0  # length of the line on screen, to blank it when rewriting
        self._reported_done = None
        self.suffix = ""  # appended to the line, e.g. a running mean; set it before `update`

    def rate(self):
        """Items per second since the first update; None until two updates are apart in time."""
        if self.first_update is None:
            return None
        elapsed = self.clock() - self.first_update
        counted = self.done - self.done_at_first_update
        if elapsed <= 0 or counted <= 0:
            return None
        return counted / elapsed

    def eta(self):
        """Seconds left at the current rate, or None if unknown."""
        rate = self.rate()
        if rate is None:
            return None
        return max(self.total - self.done, 0) / rate

    def line(self):
        """The progress text, e.g. "extract 120/400 images (30%) 21.5 images/s ETA 13s"."""
        percent = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        rate = self.rate()
        finished = self.total and self.done >= self.total
        if rate is None and finished and self.clock() > self.started:
            # All done in one update: the overall rate is the only one there is.
            rate = self.done / (self.clock() - self.started)
        rate_text = f"{rate:.1f} {self.unit}/s" if rate is not None else f"- {self.unit}/s"
        prefix = f"{self.label} " if self.label else ""
        eta = 0.0 if finished else self.eta()
        suffix = f" {self.suffix}" if self.suffix else ""
        return f"{prefix}{self.done}/{self.total} {self.unit}{percent} {rate_text} ETA {format_duration(eta)}{suffix}"

    def update(self, count=1):
        """Counts `count` more finished items and reports if the interval has passed."""
        now = self.clock()
        if self.first_update is None:
            # The first batch's time includes start-up; measuring from its end is fairer.
            self.first_update = now
            self.done_at_first_update = self.done + count
        self.done += count
        if count == 0 and self._reported_done == self.done:
            return
        if self.last_report is None or now - self.last_report >= self.interval or self.done >= self.total:
            self._write(self.line())
            self.last_report = now

    def close(self):
        """Writes the final state and ends the line; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        if self._reported_done != self.done or self.in_place:
            self._write(self.line())
        if self.in_place:
            self.stream.write("\n")
            self.stream.flush()

    def elapsed(self):
        """Seconds since construction."""
        return self.clock() - self.started

    def _write(self, text):
        if self.in_place:
            # Pad so a shorter line fully covers the previous one.
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._reported_done = self.done

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False
