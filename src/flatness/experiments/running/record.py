"""Run records: the typed :class:`RunRecord`, written atomically, read back with a clear verdict.

One JSON file ``OUT/TASK/NAME.json`` per finished run (``status`` ``"complete"`` or
``"failed"``), tagged ``"format": "flatness-run"`` and a schema ``"version"``:

* version 3 (:data:`SCHEMA_VERSION`, written now): adds ``resolved`` (every setting the run
  used: all training-config fields, all model settings, all method keyword arguments with the
  method's defaults) and, for a plugin task, ``task_source`` (the factory's reference as given,
  its resolved file or module, the SHA-256 of its file, the task's description and metric);
  version-2 records read with ``resolved`` empty and no ``task_source``;
* version 2: every epoch also records the training loss
  and accuracy measured in eval mode (``train_loss``/``train_acc`` in :attr:`RunRecord.curves`,
  on :attr:`RunRecord.train_eval_samples` training samples), the validation and test loss and
  accuracy; final values are top-level fields (``final_train_loss`` ... ``final_test_acc``);
  records written since issue 31 also hold the test split's calibration (``final_test_ece``,
  ``final_test_nll``, ``final_test_brier``, ``final_test_reliability``) and robustness
  (``final_test_robustness``), ``None`` in older version-2 records
  (:mod:`flatness.experiments.running.final_eval`);
* version 1 (the committed results): read and converted; the fields it did not record are
  ``None`` (``final_test_loss`` is taken from its ``test_loss`` curve);
* a newer version, or a file that is not valid JSON, is refused with one message naming the
  file (:class:`RecordError`); a JSON file of another format is not a run record (``None``).

Example:
    >>> record = RunRecord(name="fa_lam0.01_seed0", task="breast-cancer-mlp", method="fa",
    ...                    seed=0, status="complete", hparam="lam", value=0.01, final_test_acc=0.95)
    >>> data = record.to_json()
    >>> data["format"], data["version"], RunRecord.from_json(data) == record
    ('flatness-run', 3, True)
    >>> record.get("final_test_acc"), record.get("lambda_max", "not measured")
    (0.95, 'not measured')
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...utils import FlatnessError, atomic_write_bytes, write_json

__all__ = [
    "RECORD_FIELDS",
    "RECORD_FORMAT",
    "SCHEMA_VERSION",
    "RecordError",
    "RunRecord",
    "check_writable",
    "load_records",
    "read_record",
    "write_json",
    "write_record",
]

RECORD_FORMAT = "flatness-run"
SCHEMA_VERSION = 3
STATUSES = ("complete", "failed")


class RecordError(FlatnessError):
    """A run record that cannot be read: damaged, of an unknown version, or malformed."""


@dataclass(kw_only=True)
class RunRecord:
    """Everything one run wrote about itself (see the module docstring for the versions).

    Identity (a :class:`~flatness.experiments.running.specs.RunSpec` as plain data): ``name``, ``task``,
    ``method``, ``hparam``, ``value``, ``seed``, ``config``, ``method_kwargs``, ``trajectory``,
    ``model_kwargs``,
    ``protocol_id``, ``variant_id``, ``task_version``. What made it: ``environment``
    (:func:`~flatness.experiments.running.platforms.environment`), ``resolved``, ``task_source``
    (module docs). Results (``None`` for a failed run, which
    has ``error`` instead): final/best/validation-chosen accuracies, final losses, the runner's
    flatness measurements, times, per-epoch ``curves`` (key -> one value per epoch: ``loss`` =
    the method's running mean over the epoch's training steps; ``train_loss``/``train_acc``,
    ``val_loss``/``val_acc``, ``test_loss``/``test_acc`` = eval-mode passes after the epoch;
    ``sq_trace_per_B``, ``lr``, ``seconds``, ...), checkpoint paths relative to the results
    directory. ``extras``: values added after the run by analyses (e.g. ``lambda_max`` from
    the measures cache); :meth:`get` looks names up in the fields, then there.
    """

    name: str
    task: str
    method: str
    seed: int
    status: str
    hparam: str | None = None
    value: float | None = None
    config: dict[str, Any] = field(default_factory=dict)
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    trajectory: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # RunSpec.model_kwargs
    protocol_id: str = ""
    variant_id: str = ""
    task_version: int = 1
    ranks: int = 1
    distributed: dict[str, Any] | None = None
    train_samples: int | None = None
    val_samples: int | None = None
    test_samples: int | None = None
    train_eval_samples: int | None = None
    environment: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)  # config, model_kwargs, method_kwargs in full
    task_source: dict[str, Any] | None = None  # a plugin task's origin (world.plugins)
    error: str | None = None
    final_train_loss: float | None = None
    final_train_acc: float | None = None
    final_val_loss: float | None = None
    final_val_acc: float | None = None
    final_test_loss: float | None = None
    final_test_acc: float | None = None
    final_test_ece: float | None = None
    final_test_nll: float | None = None
    final_test_brier: float | None = None
    final_test_reliability: dict[str, Any] | None = None
    final_test_robustness: dict[str, Any] | None = None
    best_test_acc: float | None = None
    best_test_epoch: int | None = None
    val_chosen_epoch: int | None = None
    val_chosen_test_acc: float | None = None
    measured_sq_trace_per_B: float | None = None
    measured_sq_trace_per_B_stderr: float | None = None
    measurement: dict[str, Any] | None = None
    avg_train_sq_trace_per_B: float | None = None
    avg_epoch_sq_trace_per_B: float | None = None
    train_seconds: float | None = None
    seconds_per_epoch: float | None = None
    eval_seconds: float | None = None
    total_seconds: float | None = None
    steps: int | None = None
    curves: dict[str, list[Any]] = field(default_factory=dict)
    checkpoint: str | None = None
    trajectory_file: str | None = None
    finished_at: str | None = None
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Whether the run finished (``status == "complete"``)."""
        return self.status == "complete"

    def get(self, key: str, default: Any = None) -> Any:
        """The field ``key`` if set, else ``extras[key]``, else ``default`` (lookup by metric name)."""
        if key in _FIELDS and key != "extras":
            value = getattr(self, key)
            if value is not None:
                return value
        return self.extras.get(key, default)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data: ``format``, ``version``, then every field (``extras`` only if set)."""
        data: dict[str, Any] = {"format": RECORD_FORMAT, "version": SCHEMA_VERSION}
        data.update(dataclasses.asdict(self))
        if not data["extras"]:
            del data["extras"]
        return data

    @classmethod
    def from_json(cls, data: Any) -> RunRecord:
        """The record in ``data`` (parsed JSON); :class:`RecordError` says what is wrong."""
        version = _record_version(data)
        values = {k: v for k, v in data.items() if k not in ("format", "version")}
        if version == 1:
            values = _from_version_1(values)
        _check_fields(cls, values, version)
        return cls(**values)


def _record_version(data: Any) -> int:
    """The schema version of a run record's JSON ``data``, one this flatness reads (else a :class:`RecordError`)."""
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise RecordError("not a flatness run record (no \"format\": \"flatness-run\")")
    version = data.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RecordError(f"has an invalid record version {version!r}")
    if version > SCHEMA_VERSION:
        raise RecordError(
            f"is a version {version} run record, newer than this flatness reads "
            f"(up to {SCHEMA_VERSION}); upgrade flatness to read it"
        )
    return version


def _check_fields(cls: type[RunRecord], values: dict[str, Any], version: int) -> None:
    """A :class:`RecordError` unless ``values`` are the well-typed fields of a version ``version`` record."""
    new = [k for k in _V3_NEW if k in values]
    if version < 3 and new:
        raise RecordError(f"is marked version {version} but has the version-3 field(s) {new}")
    unknown = sorted(set(values) - _FIELDS.keys())
    if unknown:
        raise RecordError(f"has unknown field(s) {unknown} for a version {version} run record")
    missing = [f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in values]
    if missing:
        raise RecordError(f"lacks the field(s) {missing}")
    for key, value in values.items():
        if not _fits(value, _FIELDS[key]):
            raise RecordError(f"has a malformed field {key!r} ({type(value).__name__} {value!r:.40})")
    if values["status"] not in STATUSES:
        raise RecordError(f"has status {values['status']!r}, expected one of {STATUSES}")


_FIELDS: dict[str, Any] = typing.get_type_hints(RunRecord)
RECORD_FIELDS: frozenset[str] = frozenset(_FIELDS) - {"extras"}
_UnionType = type(int | None)
_V1_NEW = ("train_eval_samples", "final_train_loss", "final_train_acc", "final_val_loss",
           "final_test_loss", "extras")
_V3_NEW = ("resolved", "task_source")


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _from_version_1(values: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record's fields in version 2: the fields it did not have stay ``None``."""
    new = [k for k in _V1_NEW if k in values]
    if new:
        raise RecordError(f"is marked version 1 but has the version-2 field(s) {new}")
    values = dict(values)
    test_loss = (values.get("curves") or {}).get("test_loss") or [None]
    if values.get("status") == "complete" and isinstance(test_loss[-1], (int, float)):
        values["final_test_loss"] = test_loss[-1]  # v1 recorded it only as the curve's last point
    return values


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's annotation (``float`` also takes ints and NaN)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, _UnionType) else (hint,)
    for option in options:
        kind = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind in (str, dict, list) and isinstance(value, kind):
            return True
    return False



def write_record(path: str | os.PathLike[str], record: RunRecord) -> None:
    """Write ``record`` to ``path`` atomically, in the current schema version."""
    write_json(path, record.to_json())


def read_record(path: str | os.PathLike[str]) -> RunRecord | None:
    """The run record in ``path``; ``None`` if it holds JSON of another kind.

    :class:`RecordError` (one line naming ``path``) if the file cannot be read, is not valid
    JSON (e.g. truncated), or is a malformed or newer run record.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except OSError as exc:
        raise RecordError(f"cannot read run record {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RecordError(f"run record {path} is damaged (not valid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        return None
    try:
        return RunRecord.from_json(data)
    except RecordError as exc:
        raise RecordError(f"run record {path} {exc}") from None


def load_records(directory: str | os.PathLike[str]) -> list[RunRecord]:
    """Every run record in ``directory`` (``*.json``, complete and failed), sorted by name.

    Hidden files (a writer's temp files) are skipped; JSON files of other kinds are ignored.
    One :class:`RecordError` naming every unreadable record, so none is silently dropped.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FlatnessError(f"results directory {directory} does not exist")
    records, problems = [], []
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            record = read_record(path)
        except RecordError as exc:
            problems.append(str(exc))
            continue
        if record is not None:
            records.append(record)
    if problems:
        raise RecordError(
            f"{len(problems)} unreadable run record(s) in {directory}: " + "; ".join(problems)
            + " (move them away to re-run those runs, or restore them)"
        )
    return records


def check_writable(directory: Path) -> None:
    """Create ``directory`` and write a test file in it; ``FlatnessError`` saying why not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(directory / ".write-test", lambda fh: fh.write(b"ok"))
        with contextlib.suppress(FileNotFoundError):  # another sweep's check removed it first
            (directory / ".write-test").unlink()
    except OSError as exc:
        raise FlatnessError(f"cannot write results to {directory}: {exc.strerror or exc}") from None

