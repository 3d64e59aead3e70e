"""The timing half of ``flatness bench gpu``: step times, peak memory and a protocol projection.

:func:`time_block` times every method of :data:`TIMED_CASES` on one model and batch, in float32
or under bf16 autocast, through the same ``Method.step`` the training loop calls, with the
optimizer its task trains with (:func:`flatness.experiments.running.training.make_optimizer`).
Each case is first built and stepped alone: one warm-up call, then one call between
``torch.cuda.reset_peak_memory_stats`` and ``torch.cuda.max_memory_allocated`` gives its peak
memory (``NAME_peak_mb``: everything the case allocated — its model copy, gradients, optimizer
state, activations — above what was allocated before it was built) and its call time, which
sizes the timing to the time budget. Then all cases are timed together in interleaved rounds
(:func:`flatness.experiments.running.bench.time_interleaved`, every call followed by
``torch.cuda.synchronize()``, so that each sample is the device's time of a whole step), and
reported as :func:`~flatness.experiments.running.bench.ratio_result` does (``NAME_ms``,
``NAME_ratio`` to the plain step). A case that raises is recorded with its error and left out.

:func:`time_protocol_epoch` runs a fixed number of steps of a task's ``gpu`` protocol through
:func:`flatness.experiments.running.training.train` (augmentation, shuffling, the optimizer and
schedule of the protocol; synthetic images when CIFAR-100 is not in the data directory) for
each method and projects the full protocol's training time (and its per-epoch evaluation's).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ....methods import make_method
from ...world.data import Splits
from ...world.tasks import TrainConfig, get_task
from ..specs import accepts, default_method_kwargs
from ..training import make_optimizer, steps_per_epoch, train
from . import ratio_result, time_interleaved

__all__ = [
    "TIMED_CASES",
    "WINDOWS",
    "TimingPlan",
    "Budget",
    "time_block",
    "time_protocol_epoch",
]

LAM = 0.01
# name in the report -> (method, hyper-parameters); every case that takes a seed gets one
TIMED_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("none", {}),
    "fa_m1_k1": ("fa", {"lam": LAM, "probes": 1, "every": 1}),
    "fa_m5_k10": ("fa", {"lam": LAM, "probes": 5, "every": 10}),
    "fa_fo_m1_k1": ("fa", {"lam": LAM, "probes": 1, "every": 1, "backend": "finite-difference"}),
    "fa_fo_m5_k10": ("fa", {"lam": LAM, "probes": 5, "every": 10, "backend": "finite-difference"}),
    "fa_kfac_k1": ("fa", {"lam": LAM, "every": 1, "backend": "kfac"}),
    "sam": ("sam", {"rho": 0.05}),
    "gnp": ("gnp", {"rho": 0.05, "form": "fd"}),
    "nrs": ("nrs", {"eps": 0.1, "alpha": 1.0}),
    "curvature": ("curvature", {"alpha": LAM}),
}
WINDOWS: dict[str, int] = {"fa_m5_k10": 10, "fa_fo_m5_k10": 10}  # timed over whole windows
MIB = 2.0**20
TIMING_LR = 1e-4
CIFAR_TRAIN, CIFAR_TEST = 50000, 10000


@dataclass(frozen=True)
class TimingPlan:
    """Calls per case.

    ``probe_warmup`` before the memory/probe call, ``warmup`` untimed before the interleaved rounds,
    then ``rounds`` rounds of ``reps`` timed calls.
    """

    warmup: int
    rounds: int
    reps: int
    probe_warmup: int = 1


class Budget:
    """Wall-clock seconds since the command started, against ``--budget-s``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds since the budget started."""
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        """Seconds left of the budget (negative once it is spent)."""
        return self.seconds - self.elapsed()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _case(
    name: str, base: nn.Module, config: TrainConfig, x: Tensor, y: Tensor, device: torch.device,
    precision: str, seed: int,
) -> Callable[[], None]:
    """One call of case ``name``: a step (or a whole window of steps), then a device sync."""
    method_name, hp = TIMED_CASES[name]
    model = copy.deepcopy(base)
    opt = make_optimizer(model, config)
    kwargs = {**hp, "seed": seed} if accepts(method_name, "seed") else dict(hp)
    method = make_method(method_name, model, nn.CrossEntropyLoss(), **kwargs)
    length = WINDOWS.get(name, 1)

    def call() -> None:
        with _autocast(device, precision):
            for _ in range(length):
                method.step(x, y, opt)
        synchronize(device)

    return call


def _build_and_probe(
    name: str, base: nn.Module, config: TrainConfig, x: Tensor, y: Tensor, device: torch.device,
    precision: str, seed: int, warm_calls: int,
) -> tuple[Callable[[], None], float, float | None, list[str]]:
    """The case's call, one call's seconds, its peak MiB and what it warned, as a tuple.

    Taken after ``warm_calls`` warm-up calls (optimizer state, kernels chosen, workspace allocated).
    """
    cuda = device.type == "cuda"
    if cuda:
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call = _case(name, base, config, x, y, device, precision, seed)
        for _ in range(warm_calls):
            call()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - before) / MIB if cuda else None
    return call, seconds, peak, sorted({" ".join(str(w.message).split())[:200] for w in caught})


def _probe_cases(
    cases: list[str], probe: Callable[..., tuple[Callable[[], None], float, float | None, list[str]]],
    budget: Budget, reserve_s: float, out: dict[str, Any],
) -> tuple[dict[str, Callable[[], None]], dict[str, float], list[str]]:
    """Each case built and probed (:func:`_build_and_probe`) while the budget lasts: calls, seconds, cases skipped.

    A case that raises is left out; the cases' peak MiB and probe times, errors and warnings go into ``out``.
    """
    calls: dict[str, Callable[[], None]] = {}
    call_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    warned: dict[str, list[str]] = {}
    skipped: list[str] = []
    for name in cases:
        if budget.remaining() <= reserve_s:
            skipped.append(name)
            continue
        try:
            calls[name], call_s[name], peak, messages = probe(name)
        except Exception as exc:  # e.g. a backend that refuses autocast: recorded, not timed
            errors[name] = _error(exc)
            continue
        if messages:
            warned[name] = messages
        out[f"{name}_peak_mb"] = peak
        out[f"{name}_probe_ms"] = 1000.0 * call_s[name] / WINDOWS.get(name, 1)
    if errors:
        out["errors"] = errors
    if warned:
        out["warnings"] = warned
    return calls, call_s, skipped


def _fit_rounds(plan: TimingPlan, per_call: float, budget: Budget, reserve_s: float) -> tuple[int, int] | None:
    """The plan's rounds and repetitions per round, fewer until they fit the budget (``None``: one does not)."""
    rounds, reps = plan.rounds, plan.reps
    while (plan.warmup + rounds * reps) * per_call > budget.remaining() - reserve_s and rounds * reps > 1:
        rounds, reps = (rounds - 1, reps) if rounds > 1 else (rounds, reps - 1)
    if (plan.warmup + rounds * reps) * per_call > budget.remaining() - reserve_s:
        return None
    return rounds, reps


def time_block(
    label: str, build: Callable[[], nn.Module], config: TrainConfig, batch: int, features: int,
    cases: list[str], device: torch.device, precision: str, plan: TimingPlan, budget: Budget,
    seed: int, reserve_s: float = 0.0,
) -> dict[str, Any]:
    """Every case of ``cases`` on one model, one synthetic batch and one precision (module docs).

    The batch: ``batch`` inputs of ``features`` values (flattened images). ``reserve_s``: seconds of
    the budget to leave for what follows.
    """
    out: dict[str, Any] = {"model": label, "precision": precision, "batch": batch, "cases": list(cases)}
    if budget.remaining() <= reserve_s:
        return {**out, "status": "skipped", "reason": f"time budget: {budget.remaining():.0f} s left"}
    torch.manual_seed(seed)
    base = build().to(device).train()
    # A step's cost does not depend on the learning rate; a small one keeps every timed step on
    # about the same weights (no divergence while the cases repeat their steps).
    config = config.replace(lr=TIMING_LR)
    out["lr"] = TIMING_LR
    out["params"] = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, features, generator=gen).to(device)
    y = torch.randint(0, 100, (batch,), generator=gen).to(device)
    probe = functools.partial(
        _build_and_probe, base=base, config=config, x=x, y=y, device=device, precision=precision, seed=seed,
        warm_calls=plan.probe_warmup,
    )
    calls, call_s, skipped = _probe_cases(cases, probe, budget, reserve_s, out)
    if "plain" not in calls:
        why = out.get("errors", {}).get("plain", "time budget")
        return {**out, "status": "skipped", "reason": f"no plain step to compare with ({why})", "skipped": skipped}
    per_call = sum(call_s.values())
    fitted = _fit_rounds(plan, per_call, budget, reserve_s)
    if fitted is None:
        return {**out, "status": "skipped", "skipped": skipped,
                "reason": f"time budget: ~{(plan.warmup + 1) * per_call:.0f} s needed, {budget.remaining():.0f} s left"}
    rounds, reps = fitted
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each case's warnings were recorded above
            ms = time_interleaved(calls, rounds=rounds, reps_per_round=reps, warmup=plan.warmup, per_call_steps=WINDOWS)
    except Exception as exc:  # e.g. a step that diverged: the block's figures are lost, not the run
        return {**out, "status": "error", "error": _error(exc), "skipped": skipped}
    out.update(ratio_result(ms, batch, rounds * reps))
    out.update(status="timed", rounds=rounds, reps_per_round=reps, skipped=skipped)
    return out


def _protocol_data(
    config: TrainConfig, task_name: str, data_dir: str | None, look: bool, samples: int,
    eval_samples: int, seed: int,
) -> tuple[Splits, str]:
    """The first ``samples`` training images of the protocol.

    And ``eval_samples`` of each of validation and test, or synthetic images of the same shape when
    the data are not there (or, without ``look``, not looked for).
    """
    task = get_task(task_name)
    try:
        if not look:
            raise FileNotFoundError("not looked for (a dry run without --data-dir)")
        data = task.splits(config, data_dir, download=False)
        source = "cifar100"
    except Exception as exc:  # no data here: a step's time does not depend on the pixel values
        gen = torch.Generator().manual_seed(seed)
        n = samples + 2 * eval_samples
        x = torch.randn(n, 3072, generator=gen)
        y = torch.randint(0, 100, (n,), generator=gen)
        data = Splits(x[:samples], y[:samples], x[samples:samples + eval_samples],
                      y[samples:samples + eval_samples], 100, x[samples + eval_samples:], y[samples + eval_samples:])
        source = f"synthetic N(0,1) images of CIFAR-100's shape (no CIFAR-100: {_error(exc)[:160]})"
    val_x, val_y = data.x_val, data.y_val
    if val_x is None or val_y is None:  # a protocol without a validation split: test twice
        val_x, val_y = data.x_test, data.y_test
    cut = Splits(data.x_train[:samples], data.y_train[:samples], data.x_test[:eval_samples],
                 data.y_test[:eval_samples], 100, val_x[:eval_samples], val_y[:eval_samples])
    return cut, source


def time_protocol_epoch(
    steps: int, warmup_steps: int, device: torch.device, data_dir: str | None, seed: int,
    budget: Budget, methods: tuple[str, ...] = ("none", "fa", "sam"),
    task_name: str = "cifar100-resnet", build: Callable[[], nn.Module] | None = None,
    batch: int | None = None, look_for_data: bool = True, reserve_s: float = 0.0,
) -> dict[str, Any]:
    """``steps`` training steps of ``task_name``'s ``gpu`` protocol per method.

    Also the projected time of the whole protocol (``build`` / ``batch`` shrink it for a dry run;
    ``look_for_data=False`` takes synthetic images without looking for CIFAR-100).
    """
    task = get_task(task_name)
    full = task.protocol("gpu")
    config = full.replace(epochs=1, batch_size=batch or full.batch_size)
    eval_samples = config.batch_size * 4
    data, source = _protocol_data(full, task_name, data_dir, look_for_data,
                                  (steps + warmup_steps) * config.batch_size, eval_samples, seed)
    data = dataclasses.replace(data, **{f.name: getattr(data, f.name).to(device) for f in dataclasses.fields(data)
                                        if isinstance(getattr(data, f.name), Tensor)})
    # CIFAR-100: 50,000 training images less the validation split, and 10,000 test images
    train_n = CIFAR_TRAIN - round(CIFAR_TRAIN * full.val_fraction)
    per_epoch = steps_per_epoch(train_n, full.batch_size)
    eval_per_epoch = CIFAR_TRAIN + CIFAR_TEST  # train + validation + test, every epoch
    out: dict[str, Any] = {
        "task": task_name, "protocol": "gpu", "model": full.model, "batch": config.batch_size,
        "data": source, "steps_timed": steps, "warmup_steps": warmup_steps,
        "protocol_epochs": full.epochs, "protocol_steps_per_epoch": per_epoch,
        "protocol_eval_samples_per_epoch": eval_per_epoch,
    }
    warm = dataclasses.replace(data, x_train=data.x_train[: warmup_steps * config.batch_size],
                               y_train=data.y_train[: warmup_steps * config.batch_size])
    timed = dataclasses.replace(data, x_train=data.x_train[warmup_steps * config.batch_size:],
                                y_train=data.y_train[warmup_steps * config.batch_size:])
    for name in methods:
        if budget.remaining() <= reserve_s:
            out[name] = {"status": "skipped", "reason": f"time budget: {budget.remaining():.0f} s left"}
            continue
        kwargs = {**default_method_kwargs(task_name, name)}
        if accepts(name, "seed"):
            kwargs["seed"] = seed
        try:
            torch.manual_seed(seed)
            model = (build() if build is not None else task.build_model(config=full)).to(device)
            opt = make_optimizer(model, config)
            method = make_method(name, model, task.loss_fn, **kwargs)
            gen = torch.Generator().manual_seed(seed)
            common = dict(predict=task.predict, generator=gen, augment=task.augment if full.augment else None)
            if warmup_steps:
                train(model, method, opt, warm, config, evaluate_every_epoch=False, **common)  # type: ignore[arg-type]
            history = train(model, method, opt, timed, config, **common)  # type: ignore[arg-type]
        except Exception as exc:
            out[name] = {"status": "error", "error": _error(exc), "method_kwargs": kwargs}
            continue
        step_s = history.train_seconds / max(1, history.steps)
        evaluated = int(timed.y_train.shape[0]) + 2 * eval_samples
        eval_s = history.eval_seconds / evaluated
        train_total = full.epochs * per_epoch * step_s
        eval_total = full.epochs * eval_per_epoch * eval_s
        out[name] = {
            "status": "timed", "method_kwargs": kwargs, "steps": history.steps,
            "step_ms": 1000.0 * step_s, "eval_ms_per_1000_samples": 1000.0 * 1000.0 * eval_s,
            "projected_train_hours": train_total / 3600.0,
            "projected_eval_hours": eval_total / 3600.0,
            "projected_hours": (train_total + eval_total) / 3600.0,
        }
    plain = out.get("none", {})
    for name in methods:
        entry = out.get(name, {})
        if entry.get("status") == "timed" and plain.get("status") == "timed":
            entry["step_ratio"] = entry["step_ms"] / plain["step_ms"]
    out["projection_excludes"] = (
        "the per-epoch Tr(H²) measurement (2 batches × 5 probes), the final measurements and "
        "data loading; evaluation is projected from this run's eval-mode passes"
    )
    return out

