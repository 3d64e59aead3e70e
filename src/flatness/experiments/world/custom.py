r"""Your own task from parts: :func:`custom_task` (``flatness.experiments.custom_task``).

A task is a model factory, training and test data, a loss and a training protocol
(:class:`~flatness.experiments.world.config.TrainConfig`). Everything the pipeline does with the
built-in tasks — ``flatness run`` sweeps with resume and claims, ``report``, ``compare``,
``study``, ``measure``, ``landscape`` — then works on it, once a command names the function
that returns it (``FILE.py:FACTORY``, ``package.module:FACTORY`` or an installed entry point:
:mod:`flatness.experiments.world.plugins`).

* **Data**: ``(x, y)`` tensors (or NumPy arrays), or a map-style ``torch.utils.data.Dataset`` of
  ``(x, y)`` pairs, read once into memory (``default_collate``). Inputs have shape ``[N, ...]``;
  targets are class ids (integer) for classification, floats for regression.
* **Validation**: a fixed split of ``config.val_fraction`` (default 10 %) carved from ``train``
  with seed 0 — stratified by class for classification — that does not depend on a run's seed;
  or your own ``val=`` data (then ``val_fraction`` is not used).
* **Model**: ``model(**model_kwargs)`` returns a fresh ``nn.Module``; the runner calls it right
  after seeding torch's global generator with the run's seed, so a run's initial weights are a
  function of its seed (and ``flatness measure`` can rebuild them).
* **Loss**: any ``callable(output, target) -> scalar`` (a 0-d tensor, the batch mean).
* **Score** (the records' ``*_acc`` values, what ``compare`` chooses on and the report tests):
  classification: accuracy of ``predict(output)`` (default: argmax over dim 1, or ``output > 0``
  for a single logit); regression: the negative mean squared error per example (``neg_mse``);
  or your ``metric(output, target) -> per-example scores`` (higher is better).
* **Checked at definition**: the data's types and shapes, and one batch of ``config.batch_size``
  training examples through a throwaway model (seeded, the global random state restored): the
  forward pass, the loss (a finite scalar with a gradient), its backward pass, the score. What is
  wrong is one :class:`TaskDefinitionError` line.

Example:
    >>> import torch
    >>> from flatness.experiments.world.custom import custom_task
    >>> from flatness.experiments.world.tasks import TrainConfig
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(200, 5, generator=g)
    >>> y = (x[:, 0] > 0).long()
    >>> task = custom_task(name="toy", model=lambda: torch.nn.Linear(5, 2),
    ...                    train=(x[:150], y[:150]), test=(x[150:], y[150:]),
    ...                    loss=torch.nn.functional.cross_entropy,
    ...                    config=TrainConfig(epochs=2, batch_size=32, lr=1e-2, weight_decay=0.0))
    >>> task.num_classes, task.task_type, task.metric_name, list(task.protocols)
    (2, 'classification', 'accuracy', ['default'])
    >>> splits = task.load()
    >>> [int(t.shape[0]) for t in (splits.y_train, splits.y_val, splits.y_test)]
    [135, 15, 50]
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset

from ...utils import FlatnessError
from .data import SUBSET_SEED, Splits, split_validation
from .tasks import TASKS, VALIDATION_SPLIT_SEED, Task, TrainConfig

__all__ = ["TASK_TYPES", "TaskDefinitionError", "CustomTask", "custom_task"]

TASK_TYPES: tuple[str, ...] = ("classification", "regression")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
Data = Any  # (x, y) tensors or arrays, or a map-style Dataset of (x, y) pairs


class TaskDefinitionError(FlatnessError):
    """A task defined from parts that cannot work: what is wrong, in one line."""


def _oneline(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")


def _shape(t: Tensor) -> str:
    return f"[{', '.join(str(d) for d in t.shape)}]"


def _name_of(obj: Any) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


def _as_tensor(value: Any, what: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TaskDefinitionError(f"{what} is a {type(value).__name__}, expected a tensor or a NumPy array")


def _read_dataset(data: Dataset[Any], what: str) -> tuple[Any, Any]:
    """A map-style ``Dataset`` of ``(x, y)`` pairs read into memory, stacked (``default_collate``)."""
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise TaskDefinitionError(f"{what}: the Dataset has no len()") from None
    if n == 0:
        raise TaskDefinitionError(f"{what}: the Dataset is empty")
    try:
        items = [data[i] for i in range(n)]
    except Exception as exc:  # the user's __getitem__
        raise TaskDefinitionError(f"{what}: reading the Dataset failed ({_oneline(exc)})") from None
    if not (isinstance(items[0], (tuple, list)) and len(items[0]) == 2):
        raise TaskDefinitionError(f"{what}: Dataset items must be (input, target) pairs, got "
                                  f"{type(items[0]).__name__}")
    try:
        x, y = torch.utils.data.default_collate(items)
    except Exception as exc:
        raise TaskDefinitionError(
            f"{what}: the Dataset's items do not stack into tensors ({_oneline(exc)})"
        ) from None
    return x, y


def as_pair(data: Data, what: str) -> tuple[Tensor, Tensor]:
    """``data`` (``(x, y)``, or a map-style ``Dataset`` of ``(x, y)`` pairs) as two tensors."""
    if isinstance(data, IterableDataset):
        raise TaskDefinitionError(f"{what} is an IterableDataset (no fixed length or order): give a "
                                  "map-style Dataset or (x, y) tensors")
    if isinstance(data, Dataset):
        x, y = _read_dataset(data, what)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TaskDefinitionError(f"{what} must be an (x, y) pair of tensors or a torch.utils.data.Dataset, "
                                  f"got {type(data).__name__}")
    x, y = _as_tensor(x, f"{what} x"), _as_tensor(y, f"{what} y")
    if x.dim() < 2:
        raise TaskDefinitionError(f"{what} x has shape {_shape(x)}: inputs need a batch dimension and at "
                                  "least one more ([N, ...]; e.g. x.unsqueeze(1))")
    if y.dim() == 0 or int(x.shape[0]) != int(y.shape[0]):
        raise TaskDefinitionError(f"{what}: x has {int(x.shape[0])} rows but y has shape {_shape(y)}")
    if int(y.shape[0]) == 0:
        raise TaskDefinitionError(f"{what} is empty")
    return x, y


class CustomTask(Task):
    """A task from parts (:func:`custom_task` builds and checks it)."""

    def __init__(
        self,
        *,
        name: str,
        model: Callable[..., nn.Module],
        train: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor] | None,
        loss: Callable[[Tensor, Tensor], Tensor],
        protocols: dict[str, TrainConfig],
        task_type: str,
        num_classes: int,
        predict: Callable[[Tensor], Tensor] | None,
        metric: Callable[[Tensor, Tensor], Tensor] | None,
        augment: Callable[..., Tensor] | None,
        model_kwargs: dict[str, Any],
        method_defaults: dict[str, dict[str, Any]],
        description: str,
        version: int,
    ) -> None:
        super().__init__()
        self.name, self.version, self.description = name, version, description
        self.task_type, self.num_classes = task_type, num_classes
        self._model, self._loss, self._predict, self._metric = model, loss, predict, metric
        self._augment = augment
        self._train, self._test, self._val = train, test, val
        self._protocols = protocols
        self.config = next(iter(protocols.values()))
        self.model_defaults = model_kwargs
        self.method_defaults = method_defaults  # type: ignore[misc]
        self.num_features = int(train[0].shape[1])
        self.metric_name = _name_of(metric) if metric is not None else (
            "accuracy" if task_type == "classification" else "neg_mse")
        self._single_logit = False  # set by custom_task's check from the model's output

    @property
    def protocols(self) -> dict[str, TrainConfig]:
        """The task's named training protocols."""
        return dict(self._protocols)

    def load(self, data_dir_: Any = None, *, val_fraction: float | None = None, download: bool | None = None) -> Splits:
        """The splits (the data directory is not used: the data came with the task)."""
        fraction = self.config.val_fraction if val_fraction is None else float(val_fraction)
        key = ("custom", fraction)
        if key not in self._cache:
            (x_tr, y_tr), (x_te, y_te) = self._train, self._test
            raw = Splits(x_tr, y_tr, x_te, y_te, self.num_classes)
            if self._val is not None:
                splits = dataclasses.replace(raw, x_val=self._val[0], y_val=self._val[1])
            else:
                stratify = self.task_type == "classification" and y_tr.dim() == 1
                try:
                    splits = split_validation(raw, fraction, seed=VALIDATION_SPLIT_SEED, stratify=stratify)
                except ValueError:  # a class too rare to stratify: the same fixed split, unstratified
                    splits = split_validation(raw, fraction, seed=VALIDATION_SPLIT_SEED, stratify=False)
            self._cache[key] = splits
        return self._cache[key]

    def splits(self, config: TrainConfig, data_dir_: Any = None, download: bool | None = None) -> Splits:
        """The splits under ``config``'s subset sizes (regression: fixed random subsets)."""
        if self.task_type == "classification" or not any(config.subsets()):
            return super().splits(config, data_dir_, download)
        data = self.load(val_fraction=config.val_fraction)  # regression: fixed random subsets

        def cut(x: Tensor | None, y: Tensor | None, size: int) -> tuple[Any, Any]:
            if x is None or y is None or size <= 0 or size >= int(y.shape[0]):
                return x, y
            order = torch.randperm(int(y.shape[0]), generator=torch.Generator().manual_seed(SUBSET_SEED))
            keep = order[:size].sort().values
            return x[keep], y[keep]

        (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (
            cut(data.x_train, data.y_train, config.train_subset), cut(data.x_val, data.y_val, config.val_subset),
            cut(data.x_test, data.y_test, config.test_subset))
        return dataclasses.replace(data, x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, x_test=x_te, y_test=y_te)

    def build_model(
        self, num_features: int | None = None, config: TrainConfig | None = None, **settings: Any
    ) -> nn.Module:
        """``model(**model_kwargs)`` with ``settings`` over the defaults (seed the global RNG first)."""
        model = self._model(**self.model_settings(settings))
        if not isinstance(model, nn.Module):
            raise TaskDefinitionError(f"task {self.name}: the model factory {_name_of(self._model)} returned "
                                      f"{type(model).__name__}, expected a torch.nn.Module")
        return model

    def loss_fn(self, logits: Tensor, y: Tensor) -> Tensor:
        """The task's loss of the output ``logits`` against ``y``."""
        return self._loss(logits, y)

    def predict(self, logits: Tensor) -> Tensor:
        """Predicted class ids (regression: the output itself)."""
        if self._predict is not None:
            return self._predict(logits)
        if self.task_type == "regression":
            return logits
        if self._single_logit:
            return ((logits.flatten(0, 1) if logits.dim() > 1 else logits) > 0).long()
        return logits.argmax(dim=1)

    def score(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-example scores, higher is better: the metric, else hits or negative squared error."""
        n = int(logits.shape[0])
        if self._metric is not None:
            return self._metric(logits, y)
        if self.task_type == "regression":
            diff = logits.reshape(n, -1) - y.reshape(n, -1).to(logits.dtype)
            return -(diff**2).mean(dim=1)
        return (self.predict(logits).long() == y.long()).reshape(n, -1).float().mean(dim=1)

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The task's augmentation of the training batch ``x`` (``x`` itself without one)."""
        if self._augment is None:
            return x
        return self._augment(x, generator) if _takes_two(self._augment) else self._augment(x)

    def __repr__(self) -> str:
        return f"CustomTask(name={self.name!r}, {self.task_type}, config={self.config})"


def _takes_two(function: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def _check_data(task_type: str, parts: dict[str, tuple[Tensor, Tensor]]) -> None:
    (x0, y0) = parts["train"]
    for what, (x, y) in parts.items():
        if x.shape[1:] != x0.shape[1:]:
            raise TaskDefinitionError(f"{what} inputs have shape {_shape(x)}, train inputs {_shape(x0)}: "
                                      "they differ after the batch dimension")
        if y.shape[1:] != y0.shape[1:]:
            raise TaskDefinitionError(f"{what} targets have shape {_shape(y)}, train targets {_shape(y0)}")
        if task_type == "classification":
            if y.is_floating_point() and not bool(torch.all(y == y.round())):
                raise TaskDefinitionError(f"{what} targets are fractional floats: classification needs class ids "
                                          "(or say task_type='regression')")
            if bool((y < 0).any()):
                raise TaskDefinitionError(f"{what} targets hold negative class ids (min {int(y.min())})")
        elif not y.is_floating_point():
            raise TaskDefinitionError(f"{what} targets are {y.dtype}: regression needs floating-point targets")


def _check_batch(task: CustomTask, batch: tuple[Tensor, Tensor], num_classes: int | None) -> None:
    """One batch through a throwaway model: forward, loss, backward, score (see the module docs)."""
    x, y = batch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        out = _check_forward(task, x)
        _check_output(task, out, y, num_classes)
        _check_loss(task, out, y)
        _check_score(task, out, y)
        if task._augment is not None:
            _check_augment(task, x)


def _check_forward(task: CustomTask, x: Tensor) -> Tensor:
    """The output of a throwaway model (built by the task's factory, in train mode) on the batch ``x``."""
    n = int(x.shape[0])
    try:
        model = task.build_model()
    except TaskDefinitionError:
        raise
    except FlatnessError as exc:
        raise TaskDefinitionError(str(exc)) from None
    except Exception as exc:
        raise TaskDefinitionError(f"the model factory {_name_of(task._model)} raised {_oneline(exc)}") from None
    model.train()
    try:
        out = model(x)
    except Exception as exc:
        raise TaskDefinitionError(f"the model fails on a batch of {n} training inputs of shape {_shape(x)}: "
                                  f"{_oneline(exc)}") from None
    if not isinstance(out, Tensor):
        raise TaskDefinitionError(f"the model returned {type(out).__name__} for a batch, expected a tensor "
                                  "(wrap it to return the output the loss takes)")
    if out.dim() == 0 or int(out.shape[0]) != n:
        raise TaskDefinitionError(f"the model's output has shape {_shape(out)} for a batch of {n}: "
                                  "expected one row per example")
    return out


def _check_output(task: CustomTask, out: Tensor, y: Tensor, num_classes: int | None) -> None:
    """The output's width against the classes (sets ``task.num_classes``), or its shape against regression targets."""
    n = int(out.shape[0])
    if task.task_type == "classification":
        single = out.dim() == 1 or int(out.shape[1]) == 1
        task._single_logit = single
        classes = 2 if single else int(out.shape[1])
        if num_classes is not None and num_classes != classes and task._predict is None:
            raise TaskDefinitionError(f"num_classes is {num_classes} but the model outputs {classes} "
                                      "class scores per example")
        task.num_classes = num_classes or classes
        top = max(int(t[1].max()) for t in (task._train, task._test, *(() if task._val is None else (task._val,))))
        if top >= task.num_classes:
            raise TaskDefinitionError(f"the targets hold class id {top} but the model outputs "
                                      f"{task.num_classes} classes")
    elif task._metric is None and out.reshape(n, -1).shape != y.reshape(n, -1).shape:
        raise TaskDefinitionError(f"the model outputs shape {_shape(out)} for targets of shape {_shape(y)}: "
                                  "the regression score compares them elementwise")


def _check_loss(task: CustomTask, out: Tensor, y: Tensor) -> None:
    """The task's loss on the output: a finite scalar with a gradient, whose backward pass runs."""
    try:
        loss = task.loss_fn(out, y)
    except Exception as exc:
        raise TaskDefinitionError(f"the loss fails on the model's output {_shape(out)} and targets "
                                  f"{_shape(y)} ({y.dtype}): {_oneline(exc)}") from None
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        got = _shape(loss) if isinstance(loss, Tensor) else type(loss).__name__
        raise TaskDefinitionError(f"the loss returned {got}, expected a scalar (a 0-d tensor: reduce over "
                                  "the batch, e.g. the mean)")
    if not math.isfinite(float(loss.detach())):
        raise TaskDefinitionError(f"the loss is {float(loss.detach())} on the first training batch")
    if not loss.requires_grad:
        raise TaskDefinitionError("the loss does not depend on the model's parameters (no gradient)")
    try:
        loss.backward()
    except Exception as exc:
        raise TaskDefinitionError(f"the loss's backward pass fails: {_oneline(exc)}") from None


def _check_score(task: CustomTask, out: Tensor, y: Tensor) -> None:
    """The task's score on the output: one value per example."""
    n = int(out.shape[0])
    try:
        scores = task.score(out.detach(), y)
    except Exception as exc:
        raise TaskDefinitionError(
            f"the {task.metric_name} score fails on the model's output: {_oneline(exc)}"
        ) from None
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (n,):
        got = _shape(scores) if isinstance(scores, Tensor) else type(scores).__name__
        raise TaskDefinitionError(f"the {task.metric_name} score returned {got}, expected one value per "
                                  f"example [{n}]")


def _check_augment(task: CustomTask, x: Tensor) -> None:
    """The task's augmentation on the batch ``x``: a tensor with the batch's rows."""
    try:
        augmented = task.augment(x, torch.Generator().manual_seed(0))
    except Exception as exc:
        raise TaskDefinitionError(f"augment fails on a training batch: {_oneline(exc)}") from None
    if not isinstance(augmented, Tensor) or int(augmented.shape[0]) != int(x.shape[0]):
        raise TaskDefinitionError("augment must return a tensor with the batch's rows")


def _check_name(name: Any) -> None:
    """A :class:`TaskDefinitionError` unless ``name`` can name a results folder and is not a built-in task's."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise TaskDefinitionError(f"task name {name!r}: use letters, digits, '.', '_' and '-' (a folder name)")
    if name in TASKS:
        raise TaskDefinitionError(f"task name {name!r} is a built-in task's: choose another")


def _named_protocols(
    config: TrainConfig, protocols: Mapping[str, TrainConfig] | None, augment: bool
) -> dict[str, TrainConfig]:
    """The task's protocols by name, ``config`` as ``"default"`` (augmentation on in all if the task augments)."""
    named = {"default": config, **dict(protocols or {})}
    for key, value in named.items():
        if not isinstance(value, TrainConfig):
            raise TaskDefinitionError(f"protocol {key!r} is a {type(value).__name__}, expected a TrainConfig")
    if protocols and "default" in protocols:
        raise TaskDefinitionError("protocols: 'default' is the name of config=; choose another name")
    if augment:
        named = {k: v.replace(augment=True) for k, v in named.items()}
    return named


def custom_task(
    *,
    name: str,
    model: Callable[..., nn.Module],
    train: Data,
    test: Data,
    loss: Callable[[Tensor, Tensor], Tensor],
    config: TrainConfig,
    val: Data | None = None,
    protocols: Mapping[str, TrainConfig] | None = None,
    task_type: str | None = None,
    num_classes: int | None = None,
    predict: Callable[[Tensor], Tensor] | None = None,
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
    augment: Callable[..., Tensor] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    method_defaults: Mapping[str, Mapping[str, Any]] | None = None,
    description: str = "",
    version: int = 1,
) -> Task:
    """A task from parts, checked on one batch (module docs); ``TaskDefinitionError`` says what is wrong.

    Args:
        name: the task's name: its results folder ``OUT/NAME`` and the ``task`` of its records
            (letters, digits, ``.``, ``_``, ``-``; not a built-in task's name).
        model: ``model(**model_kwargs) -> nn.Module``, a fresh model (a class works).
        train: ``(x, y)`` tensors or arrays, or a map-style ``Dataset`` of ``(x, y)`` pairs.
        test: the test data, in the same forms as ``train``.
        loss: ``loss(output, target) -> scalar tensor``.
        config: the default training protocol (``flatness run`` without ``--protocol``).
        val: validation data; default: a fixed ``config.val_fraction`` of ``train``.
        protocols: more named protocols (``flatness run --protocol NAME``); the default one is
            called ``"default"``.
        task_type: ``"classification"`` or ``"regression"``; default: classification for integer
            targets, regression for floating-point ones (say ``"classification"`` for float 0/1
            targets with a BCE loss).
        num_classes: default: the width of the model's output (2 for a single logit).
        predict: ``output -> predicted class ids`` for the accuracy (default: argmax over dim 1;
            ``output > 0`` for a single logit).
        metric: ``(output, target) -> per-example scores``, higher is better, in place of the
            accuracy (regression default: negative squared error, ``neg_mse``).
        augment: ``augment(x, generator) -> x`` (or ``augment(x)``) on every training mini-batch,
            drawing from the run's seeded ``generator``; turns on ``augment`` in every protocol.
        model_kwargs: the model factory's default keyword arguments (JSON values); runs change
            them with ``--model-arg KEY=VALUE`` and record them.
        method_defaults: per-method settings this task uses by default, e.g.
            ``{"fa": {"backend": "finite-difference"}}``.
        description: one line for reports (default: made from the parts).
        version: raise it when you change the task in ways its records should not survive
            (records of another version are not taken as finished runs).
    """
    _check_name(name)
    for what, fn in (("model", model), ("loss", loss), ("predict", predict), ("metric", metric), ("augment", augment)):
        if fn is not None and not callable(fn):
            raise TaskDefinitionError(f"{what} must be callable, got {type(fn).__name__}")
    named = _named_protocols(config, protocols, augment is not None)
    if task_type is not None and task_type not in TASK_TYPES:
        raise TaskDefinitionError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if num_classes is not None and not (isinstance(num_classes, int) and num_classes >= 2):
        raise TaskDefinitionError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if not (isinstance(version, int) and version >= 1):
        raise TaskDefinitionError(f"version must be an integer >= 1, got {version!r}")
    settings = dict(model_kwargs or {})
    try:
        json.dumps(settings, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TaskDefinitionError(f"model_kwargs must be JSON values (records store them): {exc}") from None
    parts = {"train": as_pair(train, "train"), "test": as_pair(test, "test")}
    if val is not None:
        parts["val"] = as_pair(val, "val")
    y_train = parts["train"][1]
    if y_train.is_complex():
        raise TaskDefinitionError("train targets are complex numbers")
    kind = task_type or ("regression" if y_train.is_floating_point() else "classification")
    _check_data(kind, parts)
    n_train = int(y_train.shape[0])
    auto = (f"{_name_of(model)} on {n_train} training and {int(parts['test'][1].shape[0])} test examples, "
            f"{kind}, loss {_name_of(loss)}")
    task = CustomTask(
        name=name, model=model, train=parts["train"], test=parts["test"], val=parts.get("val"), loss=loss,
        protocols=named, task_type=kind, num_classes=num_classes or 0, predict=predict, metric=metric,
        augment=augment, model_kwargs=settings,
        method_defaults={k: dict(v) for k, v in (method_defaults or {}).items()},
        description=description or auto, version=version,
    )
    size = min(config.batch_size, n_train)
    _check_batch(task, (parts["train"][0][:size], parts["train"][1][:size]), num_classes)
    return task
