"""Which machine a run ran on, and a warning when one table mixes machines.

Runs with the same seed start from the same weights and see the same batches, so the report
pairs them. That pairing assumes one platform: on another CPU (another BLAS/oneDNN code path),
another accelerator or another torch build, the same seed follows a different floating-point
trajectory, and over a few epochs of SGD the difference can grow to the size of a method effect.
Every run record therefore names its CPU model and, on an accelerator, the device's name
(:func:`environment`), and :func:`platform_note` tells the reader when the runs of one table
come from more than one platform. Records written before the CPU was recorded count as
"CPU not recorded": beside runs of one named platform (and the same torch build) they get a
softer note asking the reader to check their provenance, not a claim that platforms differ.

Example:
    >>> from flatness.experiments.running.platforms import platform_label
    >>> from flatness.experiments.running.record import RunRecord
    >>> r = RunRecord(name="none_seed0", task="t", method="none", seed=0, status="complete",
    ...               environment={"torch": "2.13.0+cpu", "cpu": "AMD EPYC", "device": "cpu"})
    >>> platform_label(r)
    'AMD EPYC, torch 2.13.0+cpu'
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .record import RunRecord

__all__ = [
    "cpu_from_cpuinfo",
    "cpu_model",
    "environment",
    "platform_label",
    "platform_note",
    "source_revision",
]


def cpu_model() -> str:
    """The CPU's model name, with its family and model numbers where Linux gives them.

    From ``/proc/cpuinfo`` (e.g. ``"AMD EPYC (family 26, model 2)"``), else
    :func:`platform.processor`; ``""`` if unknown. Virtual machines often report a generic name
    ("AMD EPYC") for CPUs of different generations, whose math libraries take different code
    paths: the family and model numbers tell them apart.
    """
    try:
        name = cpu_from_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        name = ""
    return name or platform.processor() or ""


def cpu_from_cpuinfo(text: str) -> str:
    r"""The first processor of a ``/proc/cpuinfo`` text as ``"NAME (family F, model M)"``.

    Example:
        >>> cpu_from_cpuinfo("processor : 0\ncpu family : 26\nmodel : 2\nmodel name : AMD EPYC\n\nprocessor : 1\n")
        'AMD EPYC (family 26, model 2)'
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor's block is enough
            continue
        fields.setdefault(key.strip(), " ".join(value.split()))
    name = next((fields[k] for k in ("model name", "Model", "cpu model") if fields.get(k)), "")
    numbers = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"))
               if fields.get(key)]
    return f"{name} ({', '.join(numbers)})" if name and numbers else name


@functools.lru_cache(maxsize=1)
def source_revision() -> dict[str, Any]:
    """The git commit of the checkout this package runs from, and whether its tracked files differ from that commit.

    ``{"commit": SHA, "dirty": bool}``; ``{}`` for an installed copy (no git checkout around the
    package, or no ``git`` program). Computed once per process.
    """
    package_dir = Path(__file__).resolve().parents[1]
    try:
        def git(*args: str) -> str:
            return subprocess.run(
                ["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": dirty} if commit else {}


def environment(device: torch.device | str) -> dict[str, Any]:
    """What a run record says about where it ran and what made it.

    The package version, the git commit (and dirty flag) when run from a checkout, torch and Python
    versions, threads, CPU, accelerator, host, pid.
    """
    from ... import __version__

    env: dict[str, Any] = {
        "flatness": __version__,
        **source_revision(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        env["accelerator"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _where(record: RunRecord) -> str:
    env = record.environment or {}
    return env.get("accelerator") or env.get("cpu") or ""


def platform_label(record: RunRecord) -> str:
    """The platform a run's arithmetic depends on: its accelerator or CPU, and the torch build."""
    env = record.environment or {}
    return f"{_where(record) or 'CPU not recorded'}, torch {env.get('torch', 'version not recorded')}"


def platform_note(records: Iterable[RunRecord]) -> str:
    """One sentence when ``records`` come from more than one platform.

    Or when some do not name their CPU while the rest share one platform (then they may or may not
    come from it); ``""`` when all name the same platform (or none names any).
    """
    records = list(records)
    counts = Counter(platform_label(r) for r in records)
    named = {platform_label(r) for r in records if _where(r)}
    unnamed = [r for r in records if not _where(r)]
    if len(named) == 1 and unnamed:
        (label,) = named
        torch_build = label.rsplit(", torch ", 1)[1]
        if all((r.environment or {}).get("torch", torch_build) == torch_build for r in unnamed):
            n = len(unnamed)
            return (
                f"**Platform partly unrecorded.** {n} of {len(records)} runs do not name their CPU "
                f"(records written before the CPU was recorded); the others ran on {label}. The "
                "pairs are comparable only if those runs ran there too: check their provenance."
            )
    if len(counts) < 2:
        return ""
    parts = "; ".join(f"{label}: {n} run{'s' if n != 1 else ''}" for label, n in sorted(counts.items()))
    return (
        f"**Mixed platforms.** These runs come from {len(counts)} platforms ({parts}). The same seed "
        "follows a different floating-point trajectory on another CPU, accelerator or torch build, so "
        "a comparison whose pairs straddle platforms confounds the platform with the method."
    )
