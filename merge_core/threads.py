"""One thread policy for every CPU-heavy path of the library.

The problem it solves: torch runs every CPU op on an OpenMP team of
`torch.get_num_threads()` threads (all cores by default), and OpenMP threads
spin at the barrier that ends every parallel region. A worker pool that calls
into torch from several threads, or a loop of small linear algebra (SVD/QR/
matmul on matrices of a few MB), then pays for a full team per call; on a
busy machine a team member that the scheduler parks holds up every region
for a time slice. Measured on the 2-core VM, hyper-merge of the demo models:
1.8 s quiet, 8-39 s with one core busy, 2.6 s with OMP_NUM_THREADS=1.

The policy:

* `threads` (the user's setting, or `default_threads()`: the CPUs this
  process may run on, from `os.sched_getaffinity`, at most 4) is the number
  of cores the job may keep busy.
* Those cores are split between our own worker threads and torch's intra-op
  threads: `intra_op = max(1, threads // workers)`. Parallel work is done by
  workers over independent units (tensors, layers), each with one intra-op
  thread, rather than by an OpenMP team inside each small op.
* Work whose units are small (`small=True`: per-layer linear algebra on
  matrices of a few MB, where a team costs more than it gains) gets one
  intra-op thread whatever the split.
* `thread_policy(...)` applies it for a `with` block and restores the previous
  torch setting afterwards (also on errors), so callers (ComfyUI, Forge) keep
  their own setting.

On CUDA the heavy work is on the GPU; the CPU side (loading, casting) follows
the same split.
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import torch

MAX_DEFAULT_THREADS = 4
_lock = threading.Lock()
T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: cgroups/taskset), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Threads a job uses when the user did not say: every available CPU, at most 4 (the streaming
    passes are bound by memory bandwidth beyond that)."""
    return max(1, min(MAX_DEFAULT_THREADS, available_cpus()))


def resolve_threads(threads: int | None) -> int:
    """The user's `threads` (None or 0: the default), never more than the CPUs available."""
    if threads is None or int(threads) <= 0:
        return default_threads()
    return max(1, min(int(threads), available_cpus()))


@dataclass(frozen=True)
class ThreadPlan:
    threads: int     # cores the job may keep busy
    workers: int     # our own worker threads
    intra_op: int    # torch intra-op threads per op


def plan_threads(threads: int | None = None, device: str | torch.device = "cpu", workers: int | None = None,
                 small: bool = False) -> ThreadPlan:
    """How to use `threads` cores: `workers` threads of our own (default: one per core), each op
    with `threads // workers` intra-op threads, or one when the work comes in small units."""
    total = resolve_threads(threads)
    count = total if workers is None else max(1, min(int(workers), total))
    intra = 1 if small else max(1, total // count)
    return ThreadPlan(total, count, intra)


@contextmanager
def thread_policy(threads: int | None = None, device: str | torch.device = "cpu", workers: int | None = 1,
                  small: bool = False) -> Iterator[ThreadPlan]:
    """Apply the policy to torch for a `with` block, restore the previous setting afterwards.

    workers: how many threads of ours will call into torch at once (1: only this one; None: one per
    core). small: the ops are small per-layer linear algebra (one intra-op thread)."""
    plan = plan_threads(threads, device, workers, small)
    with _lock:
        saved = torch.get_num_threads()
        if plan.intra_op != saved:
            torch.set_num_threads(plan.intra_op)
    try:
        yield plan
    finally:
        with _lock:
            if torch.get_num_threads() != saved:
                torch.set_num_threads(saved)


SMALL_UNIT = 1 << 20   # elements: below this per unit of work, threads cost more than they gain


def workers_for(unit_elements: int, threads: int | None = None, units: int | None = None) -> int:
    """Worker threads for work in units of `unit_elements` (e.g. one layer of every model): one when
    the units are small (Python and the GIL dominate), else one per core (at most one per unit)."""
    total = resolve_threads(threads)
    if unit_elements < SMALL_UNIT:
        return 1
    return max(1, min(total, units if units is not None else total))


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn over items on `workers` threads (at most 2 x workers in flight, so memory stays bounded),
    results in the order of the items. workers == 1 runs in the calling thread."""
    if workers <= 1:
        for item in items:
            yield fn(item)
        return
    pending: deque[Future] = deque()
    iterator = iter(items)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="manifold") as pool:
        try:
            for item in iterator:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
