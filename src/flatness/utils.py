"""Small helpers shared across the package: model modes, batches, errors, atomic file writes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import re
import secrets
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor, nn

__all__ = [
    "FlatnessError",
    "atomic_write_bytes",
    "process_alive",
    "process_start",
    "remove_orphaned_files",
    "writer_tag",
    "unwrap",
    "compiled_parts",
    "require_double_backward",
    "module_modes",
    "restore_modes",
    "preserved_mode",
    "eval_mode",
    "batch_size",
    "take_first",
    "to_device",
    "call_model",
]


class FlatnessError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


def _is_compiled_wrapper(model: nn.Module) -> bool:
    """Whether ``model`` is what ``torch.compile(module)`` returns (an ``OptimizedModule``)."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # loaded whenever something was compiled
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a wrapper, else ``model``.

    The wrappers: DistributedDataParallel / DataParallel, and the one ``torch.compile`` returns.

    Out-of-place passes (curvature, perturbations, torch.func transforms) run on it, so that
    DDP's reducer sees exactly one forward/backward per step, and so that passes that
    differentiate twice run eagerly: compiled code has no double backward.
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif _is_compiled_wrapper(model):
            model = model._orig_mod
        else:
            return model


def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` that run compiled code.

    Compiled by ``torch.compile(sub)`` or ``sub.compile()``; ``""`` is ``model`` itself.
    """
    return [
        name for name, m in model.named_modules()
        if _is_compiled_wrapper(m) or getattr(m, "_compiled_call_impl", None) is not None
    ]


def module_modes(model: nn.Module) -> list[bool]:
    """The ``training`` flag of every submodule, in ``model.modules()`` order."""
    return [m.training for m in model.modules()]


def restore_modes(model: nn.Module, modes: list[bool]) -> None:
    """Put back per-submodule flags saved by :func:`module_modes` (a model may mix modes)."""
    for m, flag in zip(model.modules(), modes, strict=False):  # a restore must not raise: match what matches
        m.training = flag


@contextlib.contextmanager
def preserved_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's train/eval flag on exit, also when an exception is raised."""
    modes = module_modes(model)
    try:
        yield model
    finally:
        restore_modes(model, modes)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with ``model.eval()`` (dropout off) and restore the previous modes after."""
    with preserved_mode(model):
        model.eval()
        yield model


def batch_size(x: Any) -> int:
    """Number of samples in ``x``: a tensor (dense or sparse), or a tuple/list/dict of them."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError("inputs must have a batch dimension, got a 0-d tensor")
        return int(x.shape[0])
    if isinstance(x, (tuple, list)) and x:
        return batch_size(x[0])
    if isinstance(x, dict) and x:
        return batch_size(next(iter(x.values())))
    raise TypeError(f"cannot tell the batch size of {type(x).__name__}")


def check_sub_batch(sub_batch: int | float | None) -> None:
    """A ``ValueError`` unless ``sub_batch`` is ``None``, an int >= 1 or a fraction in (0, 1]."""
    if sub_batch is None:
        return
    if isinstance(sub_batch, bool) or not isinstance(sub_batch, (int, float)):
        raise ValueError(f"sub_batch must be an int or a float, got {sub_batch!r}")
    if isinstance(sub_batch, float) and not 0 < sub_batch <= 1:
        raise ValueError(f"a fractional sub_batch must be in (0, 1], got {sub_batch}")
    if isinstance(sub_batch, int) and sub_batch < 1:
        raise ValueError(f"sub_batch must be >= 1, got {sub_batch}")


def sub_batch_size(sub_batch: int | float | None, full: int) -> int:
    """How many of ``full`` samples a ``sub_batch`` (:func:`check_sub_batch`) takes.

    All for ``None``, at most ``full`` for an int, the fraction rounded up (at least 1) for a float.
    """
    if sub_batch is None:
        return full
    n = sub_batch if isinstance(sub_batch, int) else math.ceil(sub_batch * full)
    return max(1, min(n, full))


def take_first(x: Any, n: int) -> Any:
    """The first ``n`` samples of ``x`` (dense or sparse tensors, or containers of them)."""
    if isinstance(x, Tensor):
        if n >= x.shape[0]:
            return x
        if x.layout == torch.sparse_csr:
            crow = x.crow_indices()[: n + 1]
            end = int(crow[-1])
            return torch.sparse_csr_tensor(
                crow, x.col_indices()[:end], x.values()[:end], size=(n, *x.shape[1:])
            )
        if x.is_sparse:
            return x.index_select(0, torch.arange(n, device=x.device))
        return x[:n]
    if isinstance(x, tuple):
        return tuple(take_first(t, n) for t in x)
    if isinstance(x, list):
        return [take_first(t, n) for t in x]
    if isinstance(x, dict):
        return {k: take_first(v, n) for k, v in x.items()}
    return x


def to_device(x: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Move a tensor or container of tensors to ``device``."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, tuple):
        return tuple(to_device(t, device, non_blocking) for t in x)
    if isinstance(x, list):
        return [to_device(t, device, non_blocking) for t in x]
    if isinstance(x, dict):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    return x


def call_model(model: nn.Module, x: Any) -> Tensor:
    """``model(x)``; a tuple input is unpacked as positional arguments, a dict as keywords."""
    if isinstance(x, tuple):
        return model(*x)
    if isinstance(x, dict):
        return model(**x)
    return model(x)


def require_double_backward(model: nn.Module, what: str) -> None:
    """A ``ValueError`` naming the first-order backend when ``model`` has compiled parts.

    Compiled code has no double backward (``what`` differentiates twice).
    """
    compiled = compiled_parts(model)
    if compiled:
        raise ValueError(
            f"{what} differentiates twice and the compiled part(s) {compiled} of this model have no "
            "double backward (torch.compile): use backend='finite-difference' (first-order), or "
            "compile the whole model, torch.compile(model), whose eager module is then differentiated"
        )


def _create_temp_file(path: Path) -> tuple[int, Path]:
    """A new, empty, uniquely named file next to ``path``, opened for writing.

    Created with mode 0666 so that the process umask (and any default ACL) applies as to any
    new file (``tempfile.mkstemp`` would make it 0600, which ``os.replace`` keeps).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.{writer_tag()}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file_object)``, then put the bytes it wrote at ``path`` atomically.

    The content is produced in memory first (so a serialiser such as ``torch.save`` never meets
    a full disk half-way), then written to a temp file in ``path``'s folder, flushed to disk and
    renamed to ``path``: a reader sees either the old file or the complete new one. The temp
    file's name says which process writes it (:func:`writer_tag`), so that one left by a killed
    writer can be told from one being written (:func:`remove_orphaned_files`). The file
    honours the umask like any new file. On any error the temp file is removed and ``path`` is
    left as it was; a full disk (or quota) becomes one :class:`FlatnessError` naming ``path``,
    other errors of type ``OSError`` name ``path`` (not the temp file).

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
        >>> atomic_write_bytes(target, lambda fh: fh.write(b"done"))
        >>> target.read_bytes(), [p.name for p in target.parent.iterdir()]
        (b'done', ['out.txt'])
    """
    path = Path(path)
    buffer = io.BytesIO()
    write(buffer)
    data = memoryview(buffer.getbuffer())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp_file(path)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        try:
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            raise FlatnessError(
                f"disk full: could not write {path} ({exc.strerror}); nothing was written there"
            ) from None
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """``obj`` as JSON (NaN and infinities allowed) at ``path``, by :func:`atomic_write_bytes`."""
    data = (json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=True) + "\n").encode()
    atomic_write_bytes(path, lambda fh: fh.write(data))
    return Path(path)


def write_png(figure: Any, path: str | os.PathLike[str], *, dpi: int = 110, **savefig: Any) -> Path:
    """A matplotlib figure as PNG at ``path``, by :func:`atomic_write_bytes`.

    ``savefig``: more arguments of ``Figure.savefig``, e.g. ``bbox_inches="tight"``.
    """
    atomic_write_bytes(path, lambda fh: figure.savefig(fh, format="png", dpi=dpi, **savefig))
    return Path(path)


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` about ``path`` (the file being written), not about the temp file beside it."""
    if exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))


# ----------------------------------------------------------------------------- dead writers


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of process ``pid``, from Linux's /proc.

    ``None`` where the process is gone or there is no /proc.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text.rpartition(")")[2].split()  # after the command name, which may hold spaces
    try:
        return fields[0], int(fields[19])  # proc(5): field 3 is the state, field 22 the start
    except (IndexError, ValueError):
        return None


def process_start(pid: int | None = None) -> int | None:
    """When process ``pid`` (default: this one) started, in clock ticks since boot.

    ``None`` where that is unknown (no /proc). With the pid it names one process, even once the pid
    is reused.
    """
    stat = _proc_stat(os.getpid() if pid is None else pid)
    return None if stat is None else stat[1]


def process_alive(pid: int, start: int | None = None) -> bool:
    """Whether process ``pid`` of this host still runs.

    It exists and is not a zombie, and, with ``start`` (:func:`process_start` when it was seen), it
    is that process and not a later one given the same pid. A process that cannot be checked
    (another user's) counts as alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass  # it exists (another user's), or cannot be checked
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    if state in ("Z", "X"):  # killed, not yet reaped
        return False
    return start is None or started == start


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def writer_tag() -> str:
    """This process in a file name: ``w<pid>s<start>h<host>`` (start 0 where unknown)."""
    return f"w{os.getpid()}s{process_start() or 0}h{_host_tag()}"


_TAGGED = re.compile(r"^\..+\.[0-9a-f]{8}\.w(\d+)s(\d+)h([0-9a-f]{8})\.(tmp|stale)$")


def remove_orphaned_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files under ``directory`` whose writers are gone (killed half-way, e.g. by SIGKILL).

    Returns them. Only files named by :func:`writer_tag` for a process of this host are judged: a
    live writer's file, another host's, or an unknown one is left alone.
    """
    removed = []
    host = _host_tag()
    for path in sorted(Path(directory).rglob(".*")):
        match = _TAGGED.match(path.name)
        if match is None or match.group(3) != host or not path.is_file():
            continue
        pid, start = int(match.group(1)), int(match.group(2))
        if process_alive(pid, start or None):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
