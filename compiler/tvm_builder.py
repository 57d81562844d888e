"""The TVM adapter: Relax module -> tuned, (cross-)compiled shared library.

The only module of the compiler that drives TVM's compiler (``tvm.relax``, MetaSchedule,
``export_library``). Everything it decides on (target dicts, budgets) comes in as data.

Tuning database layout (persistent, shared by every model and run)::

    <tuning-db>/<target-key>/target.json                  the TVM target dict (for people)
    <tuning-db>/<target-key>/database_workload.json       MetaSchedule JSONDatabase
    <tuning-db>/<target-key>/database_tuning_record.json
    <tuning-db>/.lock                                     flock held while tuning

Records are keyed by workload (structural hash, inside the database) and by target (the
directory), so a second compile of the same model tunes nothing and another model that
shares a layer with it reuses that layer's record.

Tuning budget and progress are planned by the pure ``compiler.tuning_plan``: trials go to
tasks by weight x FLOPs, tasks with one possible schedule get one trial, and tasks with the
same budget are tuned together (MetaSchedule takes one per-task limit per call) with one
shared cost model, trained on the database's records before the first trial
(``_warm_start``). MetaSchedule's runner measures on ``runner_threads`` TVM threads.

CUDA targets (unverified on hardware: no GPU has run this path yet) take the same
database, keyed the same way: tasks are extracted from the model *before* TVM's default
GPU schedules (``tvm.s_tir.dlight``), MetaSchedule's CUDA design space obeys the target's
``max_threads_per_block`` / ``max_shared_memory_per_block`` / ``thread_warp_size`` (from
the profile), builder workers compile candidates with the artifact's nvcc for the profile's
arch (``compiler.cuda.install_nvcc_callback``), and ``LocalRunner`` measures them on
``cuda(0)`` (MetaSchedule takes the device from the target's kind). Functions that have no
record after tuning get dlight's schedules (it skips those the database scheduled).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compiler import _fast_inspect
from compiler.errors import BuildFailedError, CompilerError, UsageError
from compiler.fusion_plan import (
    AVX2,
    AVX512,
    VectorUnit,
    bf16_kernels,
    choose_block_fusion,
    precision_refusal,
    vector_unit,
)
from compiler.manifest import canonical_json
from compiler.profiles import HardwareProfile
from compiler.runtime_choice import set_tvm_threads
from compiler.tuning_plan import (
    ProgressTracker,
    TaskCost,
    choose_weight_prepack,
    split_budget,
    warm_start_sample,
)

log = logging.getLogger(__name__)
# Called with (trials finished, trials planned) while tuning.
TuningProgress = Callable[[int, int], None]
BUILDER_TIMEOUT_S = 180
RUNNER_TIMEOUT_S = 60
# Records per workload the cost model is trained on before tuning (``_warm_start``).
WARM_START_PER_WORKLOAD = 64


@dataclass
class TuningStats:
    """What tuning did for one build."""

    tasks_total: int = 0
    tasks_reused: int = 0
    tasks_tuned: int = 0
    new_trials: int = 0
    records_applied: int = 0
    database_digest: str | None = None
    wall_time_s: float = 0.0
    target_key: str | None = None
    untuned_tasks: list[str] = field(default_factory=list)
    trials_planned: int = 0
    # Per task tuned: name, weight, flops, max_useful (None: unbounded) and its trial budget.
    budget: list[dict[str, Any]] = field(default_factory=list)
    runner_threads: int | None = None
    # Weights laid out for the tuned schedules at compile time (``build_library``).
    weight_prepack: bool = False
    # Recorded tasks were tuned further (``build_library(retune=True)``).
    retune: bool = False
    # Database records the cost model was trained on before the first trial (``_warm_start``).
    warm_start_records: int = 0
    # Inverted-residual blocks computed as one hand-scheduled kernel each (compiler.tvm_fusion).
    fused_blocks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def target_key(target: dict[str, Any]) -> str:
    """Directory name of a target in the tuning database (16 hex digits)."""
    return hashlib.sha256(canonical_json(target)).hexdigest()[:16]


def effective_target(profile: HardwareProfile) -> dict[str, Any]:
    """The profile's target dict, with ``num-cores`` filled in for CPU targets.

    MetaSchedule needs ``num-cores`` for CPU targets; profiles of real boards name it, and
    for generic host profiles it is the number of physical cores of this machine.
    """
    import psutil

    target = dict(profile.tvm)
    if target["kind"] == "llvm" and "num-cores" not in target:
        target["num-cores"] = psutil.cpu_count(logical=False) or 1
    return target


@contextmanager
def _locked(db_root: Path) -> Iterator[None]:
    db_root.mkdir(parents=True, exist_ok=True)
    with (db_root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(
    mod: Any, target: Any, *, weight_prepack: bool = False, fuse_blocks: bool = False
) -> Any:
    """Lower ``mod`` to TIR calls; ``fuse_blocks`` first replaces inverted-residual blocks."""
    return _prepare_fused(mod, target, weight_prepack=weight_prepack, fuse_blocks=fuse_blocks)[0]


def _prepare_fused(
    mod: Any,
    target: Any,
    *,
    weight_prepack: bool,
    fuse_blocks: bool,
    precision: str = "fp32",
    unit: VectorUnit = AVX512,
    amx: bool = False,
    dot: bool = True,
) -> tuple[Any, list[str]]:
    """``_prepare``, also returning the blocks fused (``compiler.tvm_fusion``), their
    accumulator blocks sized for ``unit``. A bf16 build's kernels (``fusion_plan.bf16_kernels``):
    ``amx``, 1x1 convolutions on AMX tiles (also those of the blocks
    ``fusion_plan.splits_for_amx`` takes, whose depthwise stage then gets the depthwise
    kernel); ``dot``, vdpbf16ps in 1x1 kernels and blocks."""
    import tvm
    from tvm import relax

    fused: list[str] = []
    with target:
        mod = tvm.transform.Sequential(
            [
                relax.transform.DecomposeOpsForInference(),
                relax.transform.CanonicalizeBindings(),
            ]
        )(mod)
        if fuse_blocks:
            from compiler.tvm_fusion import (
                fuse_depthwise,
                fuse_depthwise_projections,
                fuse_inverted_residuals,
                fuse_max_pools,
                fuse_pointwise,
                fuse_pointwise_means,
                fuse_strided_convs,
            )

            tiles = amx and precision == "bf16"
            cores = int(target.attrs.get("num-cores", 1))
            # The ReLU6 bounds the blocks are recognized by must be constants first.
            mod, fused = fuse_inverted_residuals(
                relax.transform.FoldConstant()(mod),
                precision=precision if dot else "fp32",
                unit=unit,
                amx=tiles,
                cores=cores,
                split=precision == "fp32",
            )
            # fp32 only: a bf16 build's projections go to its bf16 kernels.
            rewrites: list[Callable[[Any], tuple[Any, list[str]]]] = (
                [
                    functools.partial(fuse_pointwise_means, unit=unit),
                    functools.partial(fuse_depthwise_projections, unit=unit, cores=cores),
                ]
                if precision == "fp32"
                else []
            )
            rewrites += [
                functools.partial(fuse_pointwise, precision=precision, unit=unit, amx=amx, dot=dot),
                functools.partial(fuse_strided_convs, unit=unit),
                functools.partial(fuse_depthwise, unit=unit),
                fuse_max_pools,
            ]
            for rewrite in rewrites:
                mod, more = rewrite(mod)
                fused += more
        mod = tvm.transform.Sequential(
            [
                relax.get_pipeline("zero"),
                # Weights (Relax constants) become layout-free buffers: MetaSchedule may then
                # pick their layout (its RewriteLayout postprocessor), see _fold_prepacked.
                *([relax.transform.AttachAttrLayoutFreeBuffers()] if weight_prepack else []),
            ]
        )(mod)
    return mod, fused


def _default_gpu_schedules(mod: Any, target: Any) -> Any:
    """TVM's default GPU schedules for every function not scheduled yet (by tuning records)."""
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(),
            dl.gpu.GEMV(),
            dl.gpu.Reduction(),
            dl.gpu.GeneralReduction(),
            dl.gpu.Fallback(),
        )(mod)


def _builder_worker_init(cuda_arch: str | None) -> None:
    """Initializer of MetaSchedule's builder workers (pickled by reference)."""
    _fast_inspect.install()
    if cuda_arch is not None:
        from compiler.cuda import install_nvcc_callback

        install_nvcc_callback(cuda_arch)


def cuda_device_present() -> bool:
    """Whether TVM sees a CUDA device here (False without the driver or its plugin)."""
    import tvm

    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no CUDA device API registered in this TVM
        return False


def _progress_callback(tracker: ProgressTracker) -> Any:
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _BatchProgress(PyMeasureCallback):  # type: ignore[misc]
        def apply(
            self,
            task_scheduler: Any,
            task_id: int,
            measure_candidates: Any,
            builder_results: Any,
            runner_results: Any,
        ) -> None:
            tracker.batch_done(len(measure_candidates))

    return _BatchProgress()


def _counting_runner(inner: Any, tracker: ProgressTracker) -> Any:
    """A runner that hands inputs to ``inner`` one at a time and counts each measured trial.

    ``LocalRunner.run`` measures synchronously, so this is per-trial progress at no cost.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner

    @derived_object
    class _CountingRunner(PyRunner):  # type: ignore[misc]
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            futures = []
            for runner_input in runner_inputs:
                futures.extend(inner.run([runner_input]))
                tracker.measured(1)
            return futures

    return _CountingRunner()


def _max_useful(context: Any) -> int | None:
    """Distinct schedules of a task: its design spaces when none samples anything."""
    spaces = context.generate_design_space()
    if any(len(space.trace.decisions) for space in spaces):
        return None
    return max(1, len(spaces))


def buffer_bytes(mod: Any) -> float:
    """Bytes the arguments (inputs and outputs) of the task's entry function hold.

    0 when a shape is not static: the budget split then goes by FLOPs alone.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    total = 0
    for arg in ms.arg_info.ArgInfo.from_entry_func(mod):
        if not isinstance(arg, ms.arg_info.TensorInfo):
            continue
        elements = 1
        for dim in arg.shape:
            if not isinstance(dim, int | tvm.tirx.IntImm):
                return 0.0
            elements *= int(dim)
        total += elements * tvm.runtime.DataType(str(arg.dtype)).bits // 8
    return float(total)


def task_costs(tasks: list[Any], contexts: list[Any]) -> list[TaskCost]:
    """Weight, FLOPs, bytes and usable trials of each extracted task (for ``split_budget``)."""
    from tvm.s_tir.analysis import estimate_tir_flops

    costs = []
    for task, context in zip(tasks, contexts, strict=True):
        try:
            flops = float(estimate_tir_flops(task.dispatched[0]))
        except Exception:  # FLOPs of some workloads cannot be estimated: treat as trivial
            flops = 0.0
        costs.append(
            TaskCost(
                name=str(task.task_name),
                weight=float(task.weight),
                flops=flops,
                max_useful=_max_useful(context),
                bytes_moved=buffer_bytes(task.dispatched[0]),
            )
        )
    return costs


def _tune(
    mod: Any,
    target: Any,
    *,
    db_dir: Path,
    trials: int,
    max_trials_per_task: int,
    progress: TuningProgress | None,
    stats: TuningStats,
    runner_threads: int | None,
    cuda_arch: str | None = None,
    retune: bool = False,
) -> None:
    """Tune the tasks of ``mod`` that have no record; ``cuda_arch`` for CUDA targets.

    ``retune`` tunes the recorded tasks too (see ``build_library``), except those whose
    design space is already measured in full.
    """
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    tasks = _extract_tasks(mod, target)
    stats.tasks_total = len(tasks)
    missing = _unrecorded(database, tasks, target)
    stats.tasks_reused = stats.tasks_total - len(missing)
    if retune and trials > 0:
        stats.retune = True
        missing = list(tasks)
    if trials <= 0 or not missing:
        stats.untuned_tasks = [t.task_name for t in missing]
        return
    # MetaSchedule's console handler writes to *stdout* at its logger's level, which would
    # corrupt --json output; keep it quiet unless edgeloop itself was asked to be verbose.
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(
        logging.INFO if log.getEffectiveLevel() <= logging.INFO else logging.ERROR
    )
    before = len(database)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        missing, work_dir=str(db_dir), num_threads="physical"
    )
    costs = task_costs(missing, contexts)
    if retune:
        keep = [
            i
            for i, (task, cost) in enumerate(zip(missing, costs, strict=True))
            if not _fully_measured(database, task.dispatched[0], cost.max_useful)
        ]
        missing = [missing[i] for i in keep]
        contexts = [contexts[i] for i in keep]
        weights = [weights[i] for i in keep]
        costs = [costs[i] for i in keep]
        if not missing:
            return
    if trials < len(missing):
        log.warning(
            "--trials %d is below the %d tasks that need tuning; giving each 1 trial",
            trials,
            len(missing),
        )
    budgets = split_budget(costs, trials, max_trials_per_task=max_trials_per_task)
    stats.budget = [{**asdict(c), "trials": b} for c, b in zip(costs, budgets, strict=True)]
    planned = sum(budgets)
    stats.trials_planned = planned
    stats.runner_threads = runner_threads
    tracker = ProgressTracker(planned, progress or (lambda _done, _planned: None))
    callbacks = [*ms.measure_callback.MeasureCallback.create("default")]
    callbacks.append(_progress_callback(tracker))
    tracker.start()
    builder = ms.builder.LocalBuilder(
        timeout_sec=BUILDER_TIMEOUT_S,
        initializer=functools.partial(_builder_worker_init, cuda_arch),
    )
    runner = _counting_runner(
        ms.runner.LocalRunner(
            timeout_sec=RUNNER_TIMEOUT_S,
            # TVM reads TVM_NUM_THREADS when the worker's thread pool starts.
            initializer=functools.partial(set_tvm_threads, runner_threads)
            if runner_threads
            else None,
        ),
        tracker,
    )
    cost_model = ms.cost_model.CostModel.create(
        "xgb", num_tuning_cores=contexts[0].num_threads, tree_method="auto"
    )
    stats.warm_start_records = _warm_start(
        cost_model, database, target, num_threads=contexts[0].num_threads
    )
    # MetaSchedule takes one per-task limit per call: tune tasks with equal budgets together,
    # largest first, sharing the database, the workers and the cost model.
    groups: dict[int, list[int]] = {}
    for index, budget in enumerate(budgets):
        groups.setdefault(budget, []).append(index)
    try:
        for budget, indices in sorted(groups.items(), reverse=True):
            ms.tune.tune_tasks(
                tasks=[contexts[i] for i in indices],
                task_weights=[weights[i] for i in indices],
                work_dir=str(db_dir),
                max_trials_global=budget * len(indices),
                max_trials_per_task=budget,
                # A task given fewer trials per iteration than it is budgeted may stay untuned.
                num_trials_per_iter=min(64, budget),
                builder=builder,
                runner=runner,
                database=database,
                cost_model=cost_model,
                measure_callbacks=callbacks,
            )
    except Exception as err:
        raise BuildFailedError(f"MetaSchedule tuning failed: {err}") from err
    tracker.finish()
    stats.tasks_tuned = len(missing)
    stats.new_trials = len(database) - before
    stats.untuned_tasks = [t.task_name for t in _unrecorded(database, missing, target)]


def _warm_start(cost_model: Any, database: Any, target: Any, *, num_threads: int) -> int:
    """Train ``cost_model`` on the records ``database`` already holds; returns how many.

    MetaSchedule's XGBoost model starts empty on every run: it picks its first 100
    candidates at random and learns only from this run's measurements, which left the many
    tasks a model's budget gives one search iteration with near-random schedules
    (docs/benchmarks.md). The database's records are measurements of this very target (it
    is the target's directory), of this model's tasks on a ``--retune`` and of other
    models' layers otherwise; the model's features are per buffer store, so what it learns
    on one convolution ranks the candidates of another. Up to ``WARM_START_PER_WORKLOAD``
    per workload (``warm_start_sample``), each workload one group of the model (its costs
    are normalized within the workload, as MetaSchedule does).
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.utils import shash2hex

    start = time.monotonic()
    groups: dict[str, list[Any]] = {}
    for record in database.get_all_tuning_records():
        groups.setdefault(shash2hex(record.workload.mod), []).append(record)
    trained = 0
    for records in groups.values():
        costs = [_median_secs(r.run_secs) for r in records]
        chosen = [records[i] for i in warm_start_sample(costs, WARM_START_PER_WORKLOAD)]
        context = ms.TuneContext(
            mod=chosen[0].workload.mod,
            target=target,
            task_name="warm-start",
            num_threads=num_threads,
        )
        try:
            candidates = [r.as_measure_candidate() for r in chosen]
        except Exception as err:  # a record this TVM cannot replay: learn from the others
            log.debug("warm start skips a workload whose records do not replay: %s", err)
            continue
        results = [ms.runner.RunnerResult(run_secs=r.run_secs, error_msg=None) for r in chosen]
        cost_model.update(context, candidates, results)
        trained += len(chosen)
    if trained:
        log.info(
            "cost model trained on %d records of %d workloads in %.1f s",
            trained,
            len(groups),
            time.monotonic() - start,
        )
    return trained


def _median_secs(run_secs: Any) -> float:
    """A record's cost as MetaSchedule's XGBoost model takes it (failed runs: 1e10 s)."""
    secs = [float(s) for s in run_secs or []]
    return float(statistics.median(secs)) if secs else 1e10


def _apply_database(mod: Any, target: Any, db_dir: Path, stats: TuningStats) -> Any:
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    records = []
    for task in _extract_tasks(mod, target):
        record = database.query_tuning_record(task.dispatched[0], target, task.task_name)
        if record is not None:
            records.append(json.dumps(_record_json(record), sort_keys=True))
    stats.records_applied = len(records)
    if records:
        stats.database_digest = hashlib.sha256("\n".join(sorted(records)).encode()).hexdigest()
    with target, database:
        return relax.transform.MetaScheduleApplyDatabase(str(db_dir))(mod)


def _extract_tasks(mod: Any, target: Any) -> list[Any]:
    """MetaSchedule's tuning tasks of ``mod``, less the kernels scheduled by hand.

    ``compiler.tvm_fusion``'s kernels are marked ``tirx.is_scheduled``: no task to tune, no
    record to look for (MetaSchedule's own task conversion would drop them silently, leaving
    its lists out of step with ours).
    """
    from tvm.s_tir import meta_schedule as ms

    return [
        task
        for task in ms.relax_integration.extract_tasks(mod, target)
        if not any(
            bool(func.attrs and func.attrs.get("tirx.is_scheduled", False))
            for func in task.mod.functions.values()
        )
    ]


def _records_cover(mod: Any, target: Any, db_dir: Path) -> bool:
    """Whether the database in ``db_dir`` has a record for every task of ``mod``."""
    records = db_dir / "database_tuning_record.json"
    if not records.is_file() or records.stat().st_size == 0:
        return False  # the common case of a fresh database: no task extraction
    from tvm.s_tir import meta_schedule as ms

    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    tasks = _extract_tasks(mod, target)
    return bool(tasks) and not _unrecorded(database, tasks, target)


def _unrecorded(database: Any, tasks: list[Any], target: Any) -> list[Any]:
    """The extracted ``tasks`` that have no record in ``database`` for ``target``."""
    return [
        t
        for t in tasks
        if database.query_tuning_record(t.dispatched[0], target, t.task_name) is None
    ]


def _fully_measured(database: Any, mod: Any, useful: int | None) -> bool:
    """Whether every distinct schedule of the task ``mod`` has a record (nothing left to find).

    ``useful`` is its count of distinct schedules (``_max_useful``; None: unbounded). Only
    tasks whose design spaces hold no sampling decision (``reshape``, elementwise ops) have
    one; their candidates are the design spaces themselves.
    """
    if useful is None or not database.has_workload(mod):
        return False
    workload = database.commit_workload(mod)
    return len(database.get_top_k(workload, useful)) >= useful


def _record_json(record: Any) -> Any:
    """A tuning record as plain JSON (for the database digest).

    ``TuningRecord.as_json()`` rejects records whose trace holds an ``IndexMap`` (the weight
    layout rewrites of prepacked builds); those take the raw FFI form, index maps as text.
    """
    try:
        return _json_ready(record.as_json())
    except TypeError:
        from tvm.s_tir.meta_schedule import _ffi_api as ms_ffi

        return _json_ready(ms_ffi.TuningRecordAsJSON(record))


def _fold_prepacked(mod: Any, target: Any) -> Any:
    """Split tuned layout rewrites of the weights out of the kernels and fold them.

    What ``relax.pipeline.static_shape_tuning_pipeline(cpu_weight_prepack=True)`` does after
    applying the database; the weights are constants here, so ``FoldConstant`` runs the
    rewrites at compile time (on this machine) and ``main`` keeps its interface.
    """
    import tvm
    from tvm import relax

    with target:
        return tvm.transform.Sequential(
            [relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant()]
        )(mod)


def _json_ready(value: Any) -> Any:
    # TuningRecord.as_json() returns TVM containers; json.dumps needs plain Python.
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "items"):
        return {str(k): _json_ready(v) for k, v in value.items()}
    try:
        return [_json_ready(v) for v in value]
    except TypeError:
        return str(value)


def build_library(
    relax_mod: Any,
    profile: HardwareProfile,
    *,
    out_path: Path,
    trials: int,
    tuning_db: Path | None,
    progress: TuningProgress | None = None,
    runner_threads: int | None = None,
    weight_prepack: bool | None = None,
    retune: bool = False,
    fuse_blocks: bool | None = None,
    precision: str = "fp32",
) -> TuningStats:
    """Compile ``relax_mod`` for ``profile`` into the shared library ``out_path``.

    Tunes missing tasks with MetaSchedule when ``trials > 0`` and always applies records
    already in ``tuning_db`` for this target. ``runner_threads`` is the TVM thread count
    candidates are measured with (None: TVM's default); ``progress`` gets
    ``(trials done, trials planned)`` after every measured trial and ends at the total.
    ``weight_prepack`` lets tuning choose the weights' memory layout, rewritten once at
    compile time (CPU profiles without a cross compiler and with a tuning database only,
    since the rewrite runs on this machine; ignored otherwise). Its tasks differ from those
    of a plain build, so it tunes and reuses records of its own. None (the default) turns it
    on where it can take effect (``tuning_plan.choose_weight_prepack``): when tuning, or when
    the database already covers every task of a prepacked build.

    CUDA profiles tune too (``trials > 0``) when TVM sees a CUDA device here to measure on
    (unverified on hardware); records for the target are applied in any case, and dlight's
    default schedules cover what they do not.

    ``retune`` continues an earlier tuning: the ``trials`` are shared over every task of the
    model, recorded ones included (MetaSchedule's evolutionary search starts from their best
    records, and the fastest record of a task is what a build applies), instead of over the
    tasks without a record only. Tasks whose few distinct schedules are all measured are left
    out. Without it a model whose tasks are all recorded tunes nothing.

    ``precision`` "bf16" computes the 1x1 convolutions that ``fusion_plan.plan_pointwise_bf16``
    takes with bf16 products (``compiler.tvm_bf16``); the profile must list avx512_bf16 and
    the hand-scheduled kernels be on (``fusion_plan.precision_refusal``).

    Raises:
        UsageError: tuning asked for a CUDA target and TVM sees no CUDA device here, or the
            profile cannot build ``precision``.
        BuildFailedError: TVM compilation, tuning or (cross-)linking failed.
    """
    import tvm

    stats = TuningStats()
    start = time.monotonic()
    target_dict = effective_target(profile)
    target = tvm.target.Target(target_dict)
    gpu = profile.has_gpu
    cuda_arch = str(profile.tvm["arch"]) if gpu else None
    if gpu and trials > 0 and tuning_db is not None and not cuda_device_present():
        raise UsageError(
            f"--trials {trials} for {profile.name}: MetaSchedule tuning of a CUDA target needs "
            "a CUDA GPU on this machine to measure on, and TVM sees none; compile with "
            "--trials 0 (TVM's default GPU schedules) here"
        )
    eligible = not gpu and not profile.cross_compiler and tuning_db is not None
    db_dir = tuning_db / target_key(target_dict) if tuning_db is not None else None
    with _fast_inspect.installed():
        fuse = choose_block_fusion(
            fuse_blocks, gpu=gpu, isa=profile.isa, features=profile.cpu_features
        )
        refusal = precision_refusal(
            precision,
            isa=profile.isa,
            features=profile.cpu_features,
            mcpu=profile.tvm.get("mcpu"),
            fused=fuse,
        )
        kernels = bf16_kernels(profile.isa, profile.cpu_features, profile.tvm.get("mcpu"))
        if refusal is not None:
            raise UsageError(f"{refusal} (profile {profile.name})")

        @functools.cache
        def prepared_fused(prepacked: bool) -> tuple[Any, list[str]]:
            return _prepare_fused(
                relax_mod,
                target,
                weight_prepack=prepacked,
                fuse_blocks=fuse,
                precision=precision,
                # ARM (by request): NEON's 32 registers of 4 lanes hold AVX2's blocks
                unit=vector_unit(profile.isa, profile.cpu_features) or AVX2,
                amx=kernels.amx,
                dot=kernels.dot,
            )

        def prepared(prepacked: bool) -> Any:  # the records check may prepare it first
            return prepared_fused(prepacked)[0]

        def records_cover() -> bool:
            assert tuning_db is not None and db_dir is not None  # eligible: has a database
            mod = prepared(True)
            with _locked(tuning_db):
                return _records_cover(mod, target, db_dir)

        try:
            prepack = choose_weight_prepack(
                weight_prepack, trials=trials, eligible=eligible, records_cover=records_cover
            )
            mod, stats.fused_blocks = prepared_fused(prepack)
        except Exception as err:
            raise BuildFailedError(
                f"TVM could not lower the model for {profile.name}: {err}"
            ) from err
        stats.weight_prepack = prepack
        if tuning_db is not None and db_dir is not None:
            stats.target_key = db_dir.name
            with _locked(tuning_db):
                db_dir.mkdir(parents=True, exist_ok=True)
                (db_dir / "target.json").write_text(
                    json.dumps(target_dict, indent=2, sort_keys=True)
                )
                _tune(
                    mod,
                    target,
                    db_dir=db_dir,
                    trials=trials,
                    max_trials_per_task=profile.tuning.max_trials_per_task,
                    progress=progress,
                    stats=stats,
                    # CUDA candidates run on the GPU; TVM's CPU threads only launch them.
                    runner_threads=None if gpu else runner_threads,
                    cuda_arch=cuda_arch,
                    retune=retune,
                )
                mod = _apply_database(mod, target, db_dir, stats)
            if prepack:
                try:
                    mod = _fold_prepacked(mod, target)
                except Exception as err:
                    raise BuildFailedError(
                        f"TVM could not prepack the weights for {profile.name}: {err}"
                    ) from err
        if gpu:
            try:
                mod = _default_gpu_schedules(mod, target)
            except Exception as err:
                raise BuildFailedError(
                    f"TVM's default GPU schedules failed for {profile.name}: {err}"
                ) from err
        try:
            if gpu:
                from compiler.cuda import nvcc_jit

                with nvcc_jit(str(profile.tvm["arch"])):
                    executable = tvm.compile(mod, target=target)
            else:
                executable = tvm.compile(mod, target=target)
        except CompilerError:
            raise
        except Exception as err:
            raise BuildFailedError(f"TVM compilation for {profile.name} failed: {err}") from err
    export_kwargs: dict[str, Any] = {}
    if profile.cross_compiler:
        export_kwargs["cc"] = profile.cross_compiler
    if gpu:
        # Ship nvcc-built device code for the profile's arch, not CUDA source (compiler.cuda).
        from compiler.cuda import fatbin_packer, find_nvcc

        find_nvcc()  # MissingDependencyError before linking, with the install hint
        export_kwargs["fpack_imports"] = fatbin_packer(str(profile.tvm["arch"]))
    try:
        executable.export_library(str(out_path), **export_kwargs)
    except CompilerError:
        raise
    except Exception as err:
        last_line = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        raise BuildFailedError(
            f"linking the {profile.isa} library with "
            f"{profile.cross_compiler or 'the host compiler'} failed: {last_line}"
        ) from err
    stats.wall_time_s = round(time.monotonic() - start, 3)
    return stats
