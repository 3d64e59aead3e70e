r"""Sweeps of a training method over its strength and seeds: ``flatness run TASK``.

A *run* is one (task, method, strength, seed, protocol) combination. Each run trains the task's
model with its default protocol (:class:`flatness.experiments.world.config.TrainConfig`, optionally overridden),
measures the final model, and writes into the results directory ``OUT/TASK/``:

* ``NAME.json`` — the :class:`~flatness.experiments.running.record.RunRecord` (written atomically,
  last): final losses and accuracies (train in eval mode, validation, test), best accuracy over
  epochs and at the epoch of best validation accuracy, the measured Tr(H²)/B of the final model
  (:func:`measure_final`), the paper's average flatness over training, times, per-epoch curves;
* ``checkpoints/NAME.pt`` — the final model (:func:`flatness.experiments.running.checkpoints.load_checkpoint`);
* ``trajectories/NAME.pt`` — ``--trajectory N`` snapshots evenly spaced along training.

``NAME`` is e.g. ``fa_lam0.01_seed0``; a non-default protocol or method setting appends a short
tag (``_pXXXXXX`` / ``_kXXXXXX``), so different protocols never share a file. Re-running a
command skips runs whose JSON is complete: a killed sweep resumes where it stopped; a run in
flight resumes after its last saved epoch (``checkpoints/NAME.state.pt``, :mod:`.resume`, written
at most every :data:`EPOCH_STATE_INTERVAL` seconds, or as many as the environment variable
``FLATNESS_EPOCH_STATE_SECONDS`` says), so it loses at most that much training.
``--jobs N`` runs N runs at a time in separate processes. Several ``flatness run`` processes (on
one machine or many) may share one ``--out``: each claims a run before training it
(:mod:`flatness.experiments.running.claims`) and skips runs others hold.

The final model is measured by :mod:`flatness.experiments.running.measure`.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...methods import make_method
from ...probes import rank_seed
from ...utils import FlatnessError, to_device
from ..world.data import Splits
from ..world.errors import SettingError
from ..world.plugins import check_source, plugin_sources, restore_plugins
from ..world.tasks import Task, TrainConfig, get_task
from .claims import claim_path, clear_leftovers, describe_holder, is_stale, read_claim, try_claim
from .distributed import DistContext, EmulatedRanks, wrap_model
from .measure import EPOCH_MEASURE_BATCHES, EPOCH_MEASURE_PROBES, measure_final, measure_sq_trace_per_B
from .outputs import Snapshots, finished_record, now, snapshot_steps, started_record, write_run
from .progress import progress_bar
from .record import RunRecord, check_writable, read_record, write_record
from .resume import RESUME_IDENTITY_KEYS, STATE_SUFFIX, EpochState
from .specs import RunSpec, accepts, identity, rank_kwargs
from .training import TrainingDiverged, make_optimizer, steps_per_epoch, train

__all__ = ["execute_run", "method_settings", "claim_and_run", "pending_runs", "check_run_options", "run_grid",
           "read_finished"]


def execute_run(
    spec: RunSpec,
    out_dir: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    progress: bool = False,
    dist_ctx: DistContext | None = None,
    emulate_ranks: int = 1,
    device: str | torch.device = "cpu",
) -> RunRecord | None:
    """Train and measure one run; write its checkpoint(s) and then its JSON record.

    A run that diverges (non-finite loss or curvature) is recorded with ``status: "failed"``;
    data problems raise :class:`FlatnessError` and write nothing.

    ``dist_ctx``: this process is one rank of a DDP job (:mod:`flatness.distributed`); every
    rank calls this with the same spec, rank 0 measures, writes and returns the record (the
    other ranks ``None``). ``emulate_ranks`` > 1 runs
    the arithmetic of that many DDP ranks in this one process (the reference of the DDP tests).
    ``device``: where model and data live (a DDP rank uses its context's device).
    """
    out = Path(out_dir)
    task = get_task(spec.task)
    config = TrainConfig.from_dict(spec.config)
    splits = task.splits(config, data_dir, download)
    kwargs = method_settings(spec, config, int(splits.y_train.shape[0]))
    torch.manual_seed(spec.seed)  # what checkpoints.initial_model replays
    model = task.build_model(num_features=splits.num_features, config=config, **spec.model_kwargs)
    world = dist_ctx.world_size if dist_ctx is not None else emulate_ranks
    is_main = dist_ctx is None or dist_ctx.is_main
    device = torch.device(dist_ctx.device if dist_ctx is not None else device)
    if device.type != "cpu":
        model, splits = model.to(device), _splits_on(splits, device)
    method = _build_method(spec, model, task.loss_fn, kwargs, dist_ctx, emulate_ranks)
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(spec.seed)
    per_epoch = steps_per_epoch(int(splits.y_train.shape[0]), config.batch_size)
    snapshots = Snapshots(model, set(snapshot_steps(config.epochs * per_epoch, spec.trajectory)))
    base = started_record(spec, task, splits, config, kwargs, world, dist_ctx, device)
    epoch_state = _epoch_state(out, spec, base, world, dist_ctx)
    started = time.perf_counter()
    try:
        history = train(
            model, method, optimizer, splits, config,
            predict=task.predict, generator=generator, progress=progress, description=spec.name,
            on_epoch_end=_epoch_measurement(model, task, splits, config, is_main),
            on_step_end=snapshots.on_step_end if snapshots.steps else None,
            shard=None if dist_ctx is None else (dist_ctx.rank, dist_ctx.world_size),
            min_batch=world,
            augment=task.augment if config.augment else None,
            # a run with a stopping rule checks it on the training split every epoch, and
            # evaluates the rest (and measures the curvature curve) once, when it stops
            evaluate_every_epoch=config.reached_stop(None, None) is None,
            score=task.score,
            epoch_state=epoch_state,
        )
    except (TrainingDiverged, FloatingPointError) as exc:
        if not is_main:
            return None
        record = dataclasses.replace(base, error=f"{type(exc).__name__}: {exc}", finished_at=now())
        write_record(out / f"{spec.name}.json", record)
        if epoch_state is not None:
            epoch_state.discard()
        return record
    if not is_main:
        return None
    if history.resumed_after_epochs:  # made by more than one process: the record says so
        base = dataclasses.replace(
            base, environment={**base.environment, "resumed_after_epochs": history.resumed_after_epochs}
        )
    measurements = measure_final(model, task, splits, config)  # fields, or else extras
    record = finished_record(base, history, measurements, config, started, trajectory=bool(snapshots.taken))
    write_run(out, spec, record, model, task.source, snapshots.taken, per_epoch)
    if epoch_state is not None:
        epoch_state.discard()
    return record


# seconds between two epoch states of a run (and after its last epoch): a killed run loses at most
# this much training, a short run writes few; the environment variable overrides it (e.g. 0 on a
# machine that preempts often)
EPOCH_STATE_INTERVAL = 60.0
EPOCH_STATE_VARIABLE = "FLATNESS_EPOCH_STATE_SECONDS"


def _epoch_state(
    out: Path, spec: RunSpec, base: RunRecord, world: int, dist_ctx: DistContext | None
) -> EpochState | None:
    """Where a one-process run saves its epoch states (:mod:`.resume`).

    ``None`` under DDP, for emulated ranks and for runs that keep a trajectory.
    """
    if dist_ctx is not None or world > 1 or spec.trajectory:
        return None
    environment = base.environment or {}
    identity = {"spec": spec.as_dict(), "environment": {k: environment.get(k) for k in RESUME_IDENTITY_KEYS}}
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    return EpochState(out / "checkpoints" / f"{spec.name}{STATE_SUFFIX}", identity, _epoch_state_interval())


def _epoch_state_interval() -> float:
    """:data:`EPOCH_STATE_INTERVAL`, or the seconds :data:`EPOCH_STATE_VARIABLE` names."""
    value = os.environ.get(EPOCH_STATE_VARIABLE)
    if value is None:
        return EPOCH_STATE_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise SettingError(f"{EPOCH_STATE_VARIABLE} must be a number of seconds >= 0, got {value!r}")
    return seconds


def method_settings(spec: RunSpec, config: TrainConfig, train_samples: int) -> dict[str, Any]:
    """The keyword arguments a run builds its method with.

    The spec's settings, its strength, its seed (the method's own randomness, e.g. FA's probes) and
    its length in steps (for schedules given as fractions of it, FA's ``lam_schedule``) where the
    method takes them.
    """
    kwargs = dict(spec.method_kwargs)
    if spec.hparam is not None and spec.value is not None:
        kwargs[spec.hparam] = spec.value
    if accepts(spec.method, "seed") and "seed" not in kwargs:
        kwargs["seed"] = spec.seed
    if accepts(spec.method, "total_steps") and "total_steps" not in kwargs:
        kwargs["total_steps"] = config.epochs * steps_per_epoch(train_samples, config.batch_size)
    return kwargs


def _splits_on(splits: Splits, device: torch.device) -> Splits:
    """``splits`` with every tensor on ``device``."""
    tensors = {f.name: getattr(splits, f.name) for f in dataclasses.fields(splits)}
    return dataclasses.replace(
        splits, **{name: to_device(value, device) for name, value in tensors.items() if isinstance(value, Tensor)}
    )


def _build_method(
    spec: RunSpec, model: nn.Module, loss_fn: Any, kwargs: dict[str, Any], dist_ctx: DistContext | None,
    emulate_ranks: int,
) -> Any:
    """The run's method.

    On this DDP rank, as ``emulate_ranks`` emulated ranks, or plain; a method refusing its settings
    is a :class:`FlatnessError` naming them.
    """
    try:
        if dist_ctx is not None:
            # identical initial weights on every rank (DDP also broadcasts rank 0's), then each
            # rank's own streams: dropout from the global generator, probes from the method's
            torch.manual_seed(rank_seed(spec.seed, dist_ctx.rank))
            return make_method(spec.method, wrap_model(model, dist_ctx), loss_fn, **rank_kwargs(kwargs, dist_ctx.rank))
        if emulate_ranks > 1:
            seeds = [rank_seed(spec.seed, r) for r in range(emulate_ranks)]
            per_rank = [make_method(spec.method, model, loss_fn, **rank_kwargs(kwargs, r))
                        for r in range(emulate_ranks)]
            return EmulatedRanks(per_rank, seeds)
        return make_method(spec.method, model, loss_fn, **kwargs)
    except (TypeError, ValueError) as exc:
        message = " ".join(str(exc).split())
        raise FlatnessError(f"method {spec.method!r} rejects its settings {kwargs}: {message}") from None


def _epoch_measurement(
    model: nn.Module, task: Task, splits: Splits, config: TrainConfig, is_main: bool
) -> Callable[[int, dict[str, Any]], dict[str, Any]]:
    """The per-epoch flatness curve.

    :func:`measure_sq_trace_per_B`, the light protocol, on the main rank only.
    """

    def on_epoch_end(epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        if not is_main:
            return {"sq_trace_per_B": float("nan")}  # measured (and recorded) by rank 0 only
        m = measure_sq_trace_per_B(
            model, task, splits.x_train, splits.y_train, config.batch_size,
            num_samples=EPOCH_MEASURE_BATCHES * config.batch_size, probes=EPOCH_MEASURE_PROBES,
        )
        return {"sq_trace_per_B": m["value"]}

    return on_epoch_end


# --------------------------------------------------------------------------------------------
# Many runs


def _worker_init(threads: int, plugins: list[tuple[str, dict[str, Any]]]) -> None:
    torch.set_num_threads(threads)
    restore_plugins(plugins)  # a spawned process knows only the built-in tasks


def _worker_run(
    spec_dict: dict[str, Any],
    out_dir: str,
    data_dir: str | None,
    download: bool | None,
    retry_failed: bool,
    device: str = "cpu",
) -> tuple[RunRecord | None, str]:
    spec = RunSpec.from_dict(spec_dict)
    return claim_and_run(spec, Path(out_dir), retry_failed, data_dir=data_dir, download=download, device=device)


def claim_and_run(
    spec: RunSpec, directory: Path, retry_failed: bool = False, **run_kwargs: Any
) -> tuple[RunRecord | None, str]:
    """Claim ``spec`` in ``directory`` and run it (:func:`execute_run`); returns (record, message).

    The record is ``None`` when another live process holds the claim (the run is skipped), or
    the one another process finished since this one looked.
    """
    claim = try_claim(directory, spec.name)
    if claim is None:
        holder = read_claim(claim_path(directory, spec.name))
        return None, f"{spec.name}: being trained by {describe_holder(holder)}; skipped"
    try:
        path = directory / f"{spec.name}.json"
        if path.exists():  # finished by another process after this one looked
            found = read_record(path)
            if found is not None and not (found.status == "failed" and retry_failed):
                return found, f"{spec.name}: finished meanwhile by another process"
        record = execute_run(spec, directory, **run_kwargs)
        assert record is not None  # one process: always the main rank
        return record, _describe(record)
    finally:
        claim.release()


def _describe(record: RunRecord) -> str:
    if not record.complete:
        return f"{record.task}/{record.name}: FAILED ({record.error})"
    resumed = (record.environment or {}).get("resumed_after_epochs")
    return (
        f"{record.task}/{record.name}: final acc {record.final_test_acc:.4f}, "
        f"Tr(H²)/B {record.measured_sq_trace_per_B:.4g}, train {record.train_seconds:.1f} s"
        + (f" (resumed after epoch {', '.join(map(str, resumed))})" if resumed else "")
    )


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def read_finished(directory: str | os.PathLike[str], name: str) -> RunRecord:
    """The record of run ``name`` in ``directory``, or one line saying why there is none.

    A run that another live process still trains (it holds the run's claim) is named with its
    holder: a second process of a sharded command says to run it again instead of failing on a
    missing file.
    """
    path = Path(directory) / f"{name}.json"
    claim = claim_path(Path(directory), name)
    holder = None if path.exists() else read_claim(claim)
    if holder is not None:
        if is_stale(claim, holder):
            raise FlatnessError(f"run {name} has no record: its claim was left by a process that is gone; "
                                "run this command again to train it")
        raise FlatnessError(f"run {name} is still being trained by {describe_holder(holder)}; run this "
                            "command again when it has finished (finished runs are kept)")
    record = read_record(path)
    if record is None:
        raise FlatnessError(f"run {name} left no record in {directory}")
    return record


def pending_runs(
    specs: Iterable[RunSpec], out_dir: str | os.PathLike[str], retry_failed: bool = False
) -> tuple[list[RunSpec], list[RunRecord]]:
    """Split ``specs`` into runs still to do and records already finished in ``out_dir``.

    A finished record whose settings differ from its spec (same file name, other settings), or
    an unreadable one, is an error: nothing is overwritten.
    """
    todo, done = [], []
    for spec in specs:
        path = Path(out_dir) / f"{spec.name}.json"
        if not path.exists():
            todo.append(spec)
            continue
        try:
            record = read_record(path)
        except FlatnessError as exc:
            raise FlatnessError(f"{exc}; move it away to re-run that run") from None
        if record is None:
            raise FlatnessError(
                f"{path} exists but is not a finished run record; move it away to re-run that run"
            )
        task = get_task(spec.task)
        check_source(record.task_source, task, f"the runs in {out_dir}")  # before: the task may have changed
        if identity(RunSpec.from_dict(dataclasses.asdict(record))) != identity(spec):
            raise FlatnessError(f"{path} holds a run with other settings; use another results directory")
        version = task.version
        if record.task_version != version:
            raise FlatnessError(
                f"{path} was made by version {record.task_version} of the {spec.task} "
                f"protocol (now {version}); use another results directory"
            )
        if record.status == "failed" and retry_failed:
            todo.append(spec)
        else:
            done.append(record)
    return todo, done


def check_run_options(
    specs: Sequence[RunSpec], *, jobs: int = 1, emulate_ranks: int = 1, distributed: bool = False
) -> None:
    """Check :func:`run_grid`'s parallelism before any work.

    A front end calls it before it starts a DDP job; a :class:`SettingError` naming the parameter
    otherwise.
    """
    _epoch_state_interval()  # a bad FLATNESS_EPOCH_STATE_SECONDS: one line before any run starts
    if jobs < 1:
        raise SettingError(f"`jobs` must be >= 1, got {jobs}", "jobs")
    if emulate_ranks < 1:
        raise SettingError(f"`emulate_ranks` must be >= 1, got {emulate_ranks}", "emulate_ranks")
    if distributed and emulate_ranks > 1:
        raise SettingError("`emulate_ranks` is the one-process twin of `dist_ctx`: use one of them",
                           "emulate_ranks", "dist_ctx")
    if (distributed or emulate_ranks > 1) and jobs != 1:
        raise SettingError("`jobs` must be 1 with `dist_ctx` / `emulate_ranks` (the ranks are the parallelism)",
                           "jobs", "dist_ctx", "emulate_ranks")
    if emulate_ranks > 1 and specs:
        smallest = min(int(s.config["batch_size"]) for s in specs)
        if emulate_ranks > smallest:
            raise SettingError(
                f"`emulate_ranks` must be at most the batch size B = {smallest} (each rank needs a sample of "
                f"every batch), got {emulate_ranks}", "emulate_ranks",
            )


def run_grid(
    specs: Sequence[RunSpec],
    out_root: str | os.PathLike[str],
    *,
    jobs: int = 1,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    log: Any = None,
    dist_ctx: DistContext | None = None,
    emulate_ranks: int = 1,
    device: str = "cpu",
) -> dict[str, list[RunRecord]]:
    """Run every pending spec (``jobs`` at a time, on ``device``), results under ``OUT/TASK/``.

    Returns the finished records per results directory. Runs already finished are skipped, and
    so are runs another process has claimed (:func:`claim_and_run`). With ``jobs > 1`` each run
    is a task for a pool of spawned processes with ``cores // jobs`` torch threads each; the
    longest runs are started first. The options are checked first (:func:`check_run_options`).
    """
    check_run_options(specs, jobs=jobs, emulate_ranks=emulate_ranks, distributed=dist_ctx is not None)
    if dist_ctx is not None:
        return _run_grid_ddp(specs, Path(out_root), dist_ctx, data_dir, download, progress, retry_failed, log)
    dirs = {spec.task: Path(out_root) / spec.task for spec in specs}
    say = log or (lambda msg: print(msg, file=sys.stderr))
    _prepare_result_dirs(dirs.values(), say)
    todo, results = _pending(specs, dirs, retry_failed)
    skipped = len(specs) - len(todo)
    if skipped:
        say(f"{skipped} of {len(specs)} runs already finished; skipping them")
    if not todo:
        return results
    todo.sort(key=lambda s: -s.cost)
    bar = progress_bar(len(todo), "runs", "run") if progress else None
    if bar is not None and log is None:
        say = bar.write
    finished = _on_finish(results, dirs, say, bar)
    try:
        if jobs == 1:
            for spec in todo:
                finished(spec, *claim_and_run(spec, dirs[spec.task], retry_failed, data_dir=data_dir,
                                              download=download, progress=progress, emulate_ranks=emulate_ranks,
                                              device=device))
        else:
            _run_pool(todo, dirs, jobs, data_dir, download, retry_failed, device, finished)
    finally:
        if bar is not None:
            bar.close()
    return results


def _prepare_result_dirs(dirs: Iterable[Path], say: Callable[[str], None]) -> None:
    """Check that each results directory is writable and clear what killed processes left in it."""
    for d in dict.fromkeys(dirs):
        check_writable(d)
        cleared = clear_leftovers(d)  # a killed sweep's claims and half-written files
        if cleared:
            say(f"{d}: removed {len(cleared)} claim(s) and temporary file(s) of killed processes")


def _on_finish(
    results: dict[str, list[RunRecord]], dirs: dict[str, Path], say: Callable[[str], None], bar: Any
) -> Callable[[RunSpec, RunRecord | None, str], None]:
    """What happens as each run ends: its record joins ``results``, its message is said, ``bar`` advances."""

    def finished(spec: RunSpec, record: RunRecord | None, message: str) -> None:
        if record is not None:
            results[str(dirs[spec.task])].append(record)
        say(message)
        if bar is not None:
            bar.update(1)

    return finished


def _pending(
    specs: Sequence[RunSpec], dirs: dict[str, Path], retry_failed: bool
) -> tuple[list[RunSpec], dict[str, list[RunRecord]]]:
    """The runs still to do, and the finished records per results directory (:func:`pending_runs`)."""
    todo: list[RunSpec] = []
    results: dict[str, list[RunRecord]] = {str(d): [] for d in dirs.values()}
    for task_name in dict.fromkeys(s.task for s in specs):
        pending, done = pending_runs([s for s in specs if s.task == task_name], dirs[task_name], retry_failed)
        todo += pending
        results[str(dirs[task_name])] += done
    return todo, results


def _run_pool(
    todo: Sequence[RunSpec], dirs: dict[str, Path], jobs: int, data_dir: str | os.PathLike[str] | None,
    download: bool | None, retry_failed: bool, device: str,
    finished: Callable[[RunSpec, RunRecord | None, str], None],
) -> None:
    """``todo`` in a pool of ``jobs`` spawned processes.

    ``finished`` called as each ends; a worker's :class:`FlatnessError` ends the sweep (the runs not
    started are cancelled).
    """
    threads = max(1, _available_cores() // jobs)
    context = multiprocessing.get_context("spawn")
    workers = min(jobs, len(todo))  # never more processes than runs
    init = (threads, plugin_sources())
    data = None if data_dir is None else str(data_dir)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init, initargs=init) as pool:
        futures: dict[Future[tuple[RunRecord | None, str]], RunSpec] = {
            pool.submit(_worker_run, spec.as_dict(), str(dirs[spec.task]), data, download, retry_failed, device): spec
            for spec in todo
        }
        remaining = set(futures)
        try:
            while remaining:
                done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                for fut in done:
                    finished(futures[fut], *fut.result())
        except BaseException:
            for fut in remaining:
                fut.cancel()
            raise


def _run_grid_ddp(
    specs: Sequence[RunSpec],
    out_root: Path,
    ctx: DistContext,
    data_dir: str | os.PathLike[str] | None,
    download: bool | None,
    progress: bool,
    retry_failed: bool,
    log: Any,
) -> dict[str, list[RunRecord]]:
    """Every rank runs the same pending runs in the same order; rank 0 decides which and writes.

    No claims: the ranks of one job must train the same runs (run one DDP job per results root).
    """
    import torch.distributed as dist

    dirs = {spec.task: out_root / spec.task for spec in specs}
    results: dict[str, list[RunRecord]] = {str(d): [] for d in dirs.values()}
    plan: list[Any] = [None]
    if ctx.is_main:
        for d in dict.fromkeys(dirs.values()):
            check_writable(d)
        todo, results = _pending(specs, dirs, retry_failed)
        plan = [[s.as_dict() for s in sorted(todo, key=lambda s: -s.cost)]]
    dist.broadcast_object_list(plan, src=0)  # a shared filesystem is not assumed
    say = log or (lambda msg: print(msg, file=sys.stderr))
    if ctx.is_main and len(specs) > len(plan[0]):
        say(f"{len(specs) - len(plan[0])} of {len(specs)} runs already finished; skipping them")
    for spec_dict in plan[0]:
        spec = RunSpec.from_dict(spec_dict)
        record = execute_run(
            spec, dirs[spec.task], data_dir=data_dir, download=download,
            progress=progress and ctx.is_main, dist_ctx=ctx,
        )
        dist.barrier()  # rank 0 has written the run before anyone starts the next
        if record is not None:  # rank 0
            results[str(dirs[spec.task])].append(record)
            say(_describe(record))
    return results
