"""How the benchmarks time: calls in alternating rounds, concurrent callers, one percentile rule.

Figures that are compared with each other are measured side by side, round by round, in
the reverse order every other round, so a drift in a shared machine's speed favours none.
"""

import math
import sys
import time


def in_alternating_rounds(functions, rounds, progress=True):
    """{name: [what `functions[name]()` returned, one a round]} over `rounds` rounds, each
    calling every function once, in the reverse order every other round. `functions`: a
    dict name -> function of no argument. progress: a line on stderr after each round."""
    names = list(functions)
    results = {name: [] for name in names}
    label = "calls" if len(names) == 1 else f"calls of each of {', '.join(names)}"
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):
            results[name].append(functions[name]())
        if progress:
            print(f"\r  {index + 1}/{rounds} {label}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr, flush=True)
    return results


def time_alternately(functions, repeats, warmup):
    """{name: seconds per call (list of `repeats` floats)} of each `functions[name]()`, after
    `warmup` untimed calls each, timed `in_alternating_rounds`."""
    for function in functions.values():
        for _ in range(warmup):
            function()

    def timed(function):
        started = time.perf_counter()
        function()
        return time.perf_counter() - started

    return in_alternating_rounds({name: (lambda function=function: timed(function))
                                  for name, function in functions.items()}, repeats)


def time_calls(function, repeats, warmup):
    """Seconds per call (list of `repeats` floats) of `function()` after `warmup` untimed calls."""
    return time_alternately({"": function}, repeats, warmup)[""]


def callers_images_per_s(function, images, callers, batch, calls):
    """Images/s of `callers` threads each making `calls` calls of `batch` images
    (`function(images=...)`, after one untimed call each), all at once: what a server that
    forms batches of `batch` gets from `callers` batch threads. `images`: a string tensor [N]."""
    import threading

    warm = threading.Barrier(callers + 1)  # every caller warmed up, and the clock about to start
    count = int(images.shape[0])

    def caller(offset):
        function(images=images[:batch])
        warm.wait()
        for index in range(calls):
            position = (offset + index * batch) % (count - batch + 1)
            function(images=images[position:position + batch])

    threads = [threading.Thread(target=caller, args=(offset,)) for offset in range(callers)]
    for thread in threads:
        thread.start()
    warm.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return callers * calls * batch / (time.perf_counter() - started)


def percentile(values, fraction):
    """The nearest-rank percentile: the smallest of `values` that at least `fraction` (0..1]
    of them do not exceed, i.e. the ceil(fraction * n)-th smallest of n (the median of 4
    values is the 2nd, p99 of 100 the 99th, p99 of 10 the largest)."""
    ordered = sorted(values)
    # Rounded first: 0.99 * 100 is 99.00000000000001 in floating point, whose ceiling is 100.
    rank = math.ceil(round(fraction * len(ordered), 9))
    return ordered[min(len(ordered), max(1, rank)) - 1]
