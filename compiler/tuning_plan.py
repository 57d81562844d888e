"""Pure planning of MetaSchedule tuning: the per-task trial budget and the progress it reports.

No TVM import: ``compiler.tvm_builder`` extracts the facts of each task (weight, FLOPs, how
many distinct schedules it has) and carries the plan out.

Budget rule (``split_budget``, also in docs/toolchain.md):

1. Every task that needs tuning gets 1 trial, so that it gets a database record (a task
   without one would be tuned again by the next compile), even when ``total`` is smaller.
2. A task never gets more than its cap: ``min(max_trials_per_task, max_useful)``, where
   ``max_useful`` is the number of distinct schedules the task has (a ``reshape`` or an
   elementwise ``add`` whose design space has no sampling decision has exactly one).
3. The rest of ``total`` is shared in proportion to ``weight x max(FLOPs, FLOPS_PER_BYTE x
   bytes)``, a roofline estimate of the task's part of the model's time (``weight`` = how
   often its workload occurs in the model; ``bytes`` = what its buffers hold, read and
   written once at least). By FLOPs alone, memory-bound tasks starved: small_cnn's pools and
   its 2048x256 dense layer got 1-2 and 24 of 200 trials while taking a quarter of its time. It is
   water-filled: a task that reaches its cap hands its surplus to the others, and budget
   nobody can use is left unspent. Whole trials by largest remainder, ties to the earlier task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Called with (trials finished, trials planned) while tuning.
ProgressFn = Callable[[int, int], None]

# Machine balance of the roofline estimate: the FLOPs a CPU core does in the time it moves one
# byte through its caches (about 100-200 GFLOP/s of FMA against 25-50 GB/s). A rough constant
# on purpose: it only has to put memory-bound tasks (pooling, batch-1 dense layers) on the
# same scale as convolutions, not predict a latency.
FLOPS_PER_BYTE = 4.0


def choose_weight_prepack(
    requested: bool | None,
    *,
    trials: int,
    eligible: bool,
    records_cover: Callable[[], bool],
) -> bool:
    """Whether a build lets tuning pick the weights' layout (``--weight-prepack``).

    ``requested`` True / False is the user's explicit choice; None (the default) means: on
    whenever it can take effect, i.e. a build that ``eligible`` (CPU code built natively with
    a tuning database) and either tunes (``trials > 0``) or finds every task of the
    prepacked build recorded already (``records_cover``, called only then), so that a
    ``--trials 0`` rebuild keeps using what a tuned (prepacked) compile recorded. Prepacked
    builds tune tasks of their own, so the two kinds of record never mix.
    Measured in docs/benchmarks.md: at equal trials the prepacked records were 1.6x (small_cnn)
    and 1.7x (mlp) faster, the models equal or 7 % faster.
    """
    if not eligible or requested is False:
        return False
    if requested or trials > 0:
        return True
    return records_cover()


@dataclass(frozen=True)
class TaskCost:
    """What the budget split needs to know about one tuning task."""

    name: str
    weight: float
    flops: float
    max_useful: int | None = None  # None: more distinct schedules than any budget
    bytes_moved: float = 0.0  # what the task's buffers (inputs and outputs) hold

    @property
    def score(self) -> float:
        """The task's estimated share of the model's time (never negative).

        ``weight x max(FLOPs, FLOPS_PER_BYTE x bytes_moved)``: compute-bound tasks by their
        arithmetic, memory-bound ones by the bytes they must move.
        """
        work = max(0.0, self.flops, FLOPS_PER_BYTE * self.bytes_moved)
        return max(0.0, self.weight) * work


def task_cap(task: TaskCost, max_trials_per_task: int) -> int:
    """Most trials ``task`` may get: the profile's per-task limit or what it can use."""
    cap = max(1, max_trials_per_task)
    if task.max_useful is not None:
        cap = min(cap, max(1, task.max_useful))
    return cap


def split_budget(tasks: Sequence[TaskCost], total: int, *, max_trials_per_task: int) -> list[int]:
    """Trials per task (same order as ``tasks``) under the rule in the module docstring.

    Raises:
        ValueError: ``total`` is negative or ``max_trials_per_task`` is below 1.
    """
    if total < 0:
        raise ValueError(f"total trials {total} is negative; give 0 or more")
    if max_trials_per_task < 1:
        raise ValueError(f"max_trials_per_task {max_trials_per_task} must be at least 1")
    if not tasks:
        return []
    caps = [task_cap(t, max_trials_per_task) for t in tasks]
    budget = [1] * len(tasks)
    remaining = total - len(tasks)
    open_ids = [i for i in range(len(tasks)) if budget[i] < caps[i] and tasks[i].score > 0]
    while remaining > 0 and open_ids:
        weight_sum = sum(tasks[i].score for i in open_ids)
        shares = {i: remaining * tasks[i].score / weight_sum for i in open_ids}
        # Tasks whose share would pass their cap are filled up; the rest is shared again.
        capped = [i for i in open_ids if budget[i] + shares[i] >= caps[i]]
        if capped:
            for i in capped:
                remaining -= caps[i] - budget[i]
                budget[i] = caps[i]
            open_ids = [i for i in open_ids if i not in capped]
            continue
        floors = {i: math.floor(shares[i]) for i in open_ids}
        for i in open_ids:
            budget[i] += floors[i]
        left = remaining - sum(floors.values())
        by_remainder = sorted(open_ids, key=lambda i: (-(shares[i] - floors[i]), i))
        for i in by_remainder[:left]:
            budget[i] += 1
        remaining = 0
    return budget


def warm_start_sample(costs: Sequence[float], cap: int) -> list[int]:
    """Indices of one workload's records to train the cost model on before tuning.

    All of them up to ``cap``; above it, ``cap`` records spread evenly over the ranking by
    cost (the fastest and the slowest always included), so the model sees good and bad
    schedules of the workload in their proportions, the same ones on every run.

    Raises:
        ValueError: ``cap`` is below 2 (the fastest and the slowest).
    """
    if cap < 2:
        raise ValueError(f"warm-start cap {cap} must be at least 2")
    ranked = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    if len(ranked) <= cap:
        return ranked
    last = len(ranked) - 1
    return [ranked[round(k * last / (cap - 1))] for k in range(cap)]


class ProgressTracker:
    """Turns tuning events into a monotone ``(done, planned)`` sequence ending at ``planned``.

    The runner reports each trial it measured (``measured``); the measure callback reports
    each finished batch with its candidate count (``batch_done``), which also counts the
    candidates that failed to build and so never reached the runner. ``finish`` reports the
    total even when the search ran out of distinct candidates before the budget. Until then
    the count stops one short of the total: MetaSchedule goes on searching and building after
    the last trial it counts (2 minutes after 40 of 40 small_cnn trials on a 2-vCPU box;
    10 minutes after 264 of mobilenet_v2's), and a full bar would say tuning is over.
    """

    def __init__(self, planned: int, callback: ProgressFn) -> None:
        self.planned = max(0, planned)
        self._callback = callback
        self._committed = 0  # candidates of finished batches
        self._in_batch = 0  # trials measured in the batch under way
        self._reported = -1

    @property
    def done(self) -> int:
        """Trials finished so far (at most ``planned - 1`` before ``finish``)."""
        return max(0, min(self.planned - 1, self._committed + self._in_batch))

    def _report(self, value: int) -> None:
        if value > self._reported:
            self._reported = value
            self._callback(value, self.planned)

    def start(self) -> None:
        """Report ``(0, planned)``."""
        self._report(0)

    def measured(self, count: int = 1) -> None:
        """``count`` more trials were measured by the runner."""
        self._in_batch += count
        self._report(self.done)

    def batch_done(self, candidates: int) -> None:
        """A batch of ``candidates`` finished (built, measured or failed)."""
        self._committed += max(candidates, self._in_batch)
        self._in_batch = 0
        self._report(self.done)

    def finish(self) -> None:
        """Report ``(planned, planned)``: tuning is over."""
        self._report(self.planned)
