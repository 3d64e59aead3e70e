"""Datasets of the paper's experiments, and where they are looked for.

The data directory is, in order: an explicit ``data_dir`` argument (``--data-dir``), the
``FLATNESS_DATA`` environment variable, then ``~/.cache/flatness``. Nothing here assumes a
particular machine: a missing file gives a :class:`~flatness.utils.FlatnessError` saying which
file goes where (or how it is downloaded), and a damaged one says so.

* CIFAR-100: ``cifar-100-python.tar.gz`` or the folder ``cifar-100-python/`` (the standard
  "python version" pickles; the ``filenames`` key may be absent). The structure of a local copy is
  checked (shapes, label range, per-class counts); the md5 only verifies a fresh download.
* 20 Newsgroups "bydate": scikit-learn's cache ``20news-bydate_py3.pkz`` (in
  ``scikit_learn_data/`` or the data directory itself), else the archive
  ``20news-bydate.tar.gz`` read with scikit-learn's ``load_files``, else a download through
  ``fetch_20newsgroups``. Features are TF-IDF (fit on the training documents only), kept sparse.
* Breast Cancer Wisconsin: bundled with scikit-learn.

Example:
    >>> from flatness.experiments.world.data import load_breast_cancer, split_validation
    >>> splits = split_validation(load_breast_cancer(), 0.1)
    >>> splits.x_train.shape[0] + splits.x_val.shape[0], splits.x_test.shape[0]
    (455, 114)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...utils import FlatnessError

__all__ = [
    "DATA_ENV",
    "OFFLINE_ENV",
    "CIFAR100_URL",
    "CIFAR100_MD5",
    "data_dir",
    "download_allowed",
    "Splits",
    "select_rows",
    "split_validation",
    "stratified_subset",
    "SUBSET_SEED",
    "load_breast_cancer",
    "load_cifar100",
    "load_newsgroups_text",
    "load_newsgroups",
    "scipy_to_torch_csr",
]

DATA_ENV = "FLATNESS_DATA"
OFFLINE_ENV = "FLATNESS_OFFLINE"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
NEWSGROUPS_CACHE = "20news-bydate_py3.pkz"
NEWSGROUPS_ARCHIVE = "20news-bydate.tar.gz"
SUBSET_SEED = 0  # the fixed subsets of a task's protocol (TrainConfig.train_subset, ...)


def _oneline(exc: BaseException) -> str:
    """An exception's message on one line (some libraries put a list of causes on several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the data directory (argument, then ``$FLATNESS_DATA``, then the user cache)."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "flatness"


def download_allowed(download: bool | None = None) -> bool:
    """Whether a missing dataset may be downloaded (``FLATNESS_OFFLINE=1`` forbids it)."""
    if download is not None:
        return download
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("", "0", "false", "no")


@dataclass
class Splits:
    """Train, (optional) validation and test tensors of one task; inputs may be sparse CSR.

    ``pixel_mean``/``pixel_std``: for images standardised per channel, the channel statistics
    used (pixels in [0, 1]), so that pixel-space corruptions can undo and redo it.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    pixel_mean: tuple[float, ...] | None = None
    pixel_std: tuple[float, ...] | None = None

    @property
    def num_features(self) -> int:
        """The input width (columns of ``x_train``)."""
        return int(self.x_train.shape[1])


@contextlib.contextmanager
def _quiet_sparse_beta() -> Any:
    # torch warns once per process that sparse CSR is "beta"; the ops used here are stable.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def select_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` of a dense, sparse-CSR or sparse-COO matrix, in that order.

    CSR rows are gathered with tensor ops (no densifying): each selected row's slice of
    ``col_indices``/``values`` is located from ``crow_indices`` and copied in one gather.
    """
    index = index.to(torch.long)
    if x.layout == torch.sparse_csr:
        crow, col, val = x.crow_indices(), x.col_indices(), x.values()
        starts = crow[index]
        lengths = crow[index + 1] - starts
        new_crow = torch.zeros(len(index) + 1, dtype=crow.dtype, device=crow.device)
        torch.cumsum(lengths, 0, out=new_crow[1:])
        total = int(new_crow[-1])
        # Position k of the output lies in output row r(k); its source is starts[r] + (k - new_crow[r]).
        offsets = torch.repeat_interleave(starts - new_crow[:-1], lengths, output_size=total)
        source = torch.arange(total, device=crow.device) + offsets
        with _quiet_sparse_beta():
            return torch.sparse_csr_tensor(
                new_crow,
                col[source],
                val[source],
                size=(len(index), *x.shape[1:]),
                check_invariants=False,  # rows of a valid matrix: valid by construction
            )
    if x.is_sparse:
        return x.index_select(0, index)
    return x[index]


def split_validation(splits: Splits, fraction: float, seed: int = 0, *, stratify: bool = True) -> Splits:
    """Carve a fixed validation split of ``fraction`` out of the training set.

    Stratified by label unless ``stratify`` is false (regression targets).

    The split depends only on ``seed`` (not on a run's seed), so every run of a sweep trains on
    the same samples. ``fraction == 0`` returns the splits unchanged (no validation set).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return replace(splits, x_val=None, y_val=None)
    from sklearn.model_selection import train_test_split

    n = int(splits.y_train.shape[0])
    labels = splits.y_train.cpu().numpy()
    keep, held = train_test_split(
        np.arange(n), test_size=fraction, stratify=labels if stratify else None, random_state=seed
    )
    keep_t, held_t = torch.from_numpy(np.asarray(keep)), torch.from_numpy(np.asarray(held))
    return replace(
        splits,
        x_train=select_rows(splits.x_train, keep_t),
        y_train=splits.y_train[keep_t],
        x_val=select_rows(splits.x_train, held_t),
        y_val=splits.y_train[held_t],
    )


def stratified_subset(x: Tensor, y: Tensor, size: int, seed: int = SUBSET_SEED) -> tuple[Tensor, Tensor]:
    """A fixed class-stratified subset of ``size`` rows (all rows if ``size`` is 0 or too large)."""
    n = int(y.shape[0])
    if size <= 0 or size >= n:
        return x, y
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(n), train_size=size, stratify=y.cpu().numpy(), random_state=seed)
    index = torch.from_numpy(np.sort(np.asarray(keep)))
    return select_rows(x, index), y[index]


def load_breast_cancer(split_seed: int = 0, test_fraction: float = 0.2) -> Splits:
    """scikit-learn's bundled Breast Cancer Wisconsin data, a fixed stratified split, standardised.

    569 samples, 30 features; 80/20 gives 455 training samples as in the paper. Features are
    standardised with training-set statistics. Labels are float {0, 1} for BCE-with-logits.
    """
    from sklearn.datasets import load_breast_cancer as _load
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    bunch = _load()
    x_tr, x_te, y_tr, y_te = train_test_split(
        bunch.data,
        bunch.target,
        test_size=test_fraction,
        stratify=bunch.target,
        random_state=split_seed,
    )
    scaler = StandardScaler().fit(x_tr)
    as_x = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    as_y = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return Splits(
        as_x(scaler.transform(x_tr)), as_y(y_tr), as_x(scaler.transform(x_te)), as_y(y_te), 2
    )


# --------------------------------------------------------------------------------------------
# Downloads


def _download(url: str, dest: Path, md5: str | None) -> None:
    """Fetch ``url`` to ``dest`` atomically (temp file in the same folder), checking its md5."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise FlatnessError(
                f"downloaded {url} has md5 {digest.hexdigest()}, expected {md5}; not kept"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# --------------------------------------------------------------------------------------------
# CIFAR-100


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays: a data file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _unpickle(raw: bytes | Any) -> Any:
    stream = io.BytesIO(raw) if isinstance(raw, bytes) else raw
    return _ArrayUnpickler(stream, encoding="latin1").load()


def _cifar_source(root: Path, download: bool) -> Path:
    archive, folder = root / CIFAR100_ARCHIVE, root / CIFAR100_FOLDER
    if archive.is_file():
        return archive
    if (folder / "train").is_file() and (folder / "test").is_file():
        return folder
    where = (
        f"CIFAR-100 not found: put {CIFAR100_ARCHIVE} (from {CIFAR100_URL}) or its extracted "
        f"folder {CIFAR100_FOLDER}/ (holding 'train' and 'test') into {root} "
        f"(the data directory: --data-dir, ${DATA_ENV} or ~/.cache/flatness)"
    )
    if not download:
        raise FlatnessError(where)
    try:
        _download(CIFAR100_URL, archive, CIFAR100_MD5)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise FlatnessError(f"{where}; the download failed ({_oneline(exc)})") from None
    return archive


def _read_cifar_parts(source: Path) -> dict[str, dict[str, Any]]:
    parts: dict[str, dict[str, Any]] = {}
    try:
        if source.is_dir():
            for part in ("train", "test"):
                with open(source / part, "rb") as fh:
                    parts[part] = _unpickle(fh)
        else:
            with tarfile.open(source, "r:*") as tar:
                names = set(tar.getnames())
                for part in ("train", "test"):
                    member = f"{CIFAR100_FOLDER}/{part}"
                    stream = tar.extractfile(member) if member in names else None
                    if stream is None:
                        raise FlatnessError(
                            f"{source} is corrupted (it has no file {member}); "
                            f"replace it with the archive from {CIFAR100_URL}"
                        )
                    parts[part] = _unpickle(stream.read())
    except (tarfile.TarError, pickle.UnpicklingError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise FlatnessError(f"{source} is corrupted ({_oneline(exc)})") from None
    return parts


def _check_cifar_part(source: Path, part: str, d: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    bad = f"{source} is not a valid CIFAR-100 copy ({part}): "
    if not isinstance(d, dict) or "data" not in d or "fine_labels" not in d:
        raise FlatnessError(bad + "expected a dict with 'data' and 'fine_labels'")
    x, y = np.asarray(d["data"]), np.asarray(d["fine_labels"])
    if x.shape != (n, 3072) or x.dtype != np.uint8:
        raise FlatnessError(bad + f"data is {x.dtype}{list(x.shape)}, expected uint8[{n}, 3072]")
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise FlatnessError(bad + f"fine_labels has shape {list(y.shape)}, expected [{n}]")
    if y.min() < 0 or y.max() > 99:
        raise FlatnessError(bad + f"labels span {y.min()}..{y.max()}, expected 0..99")
    counts = np.bincount(y, minlength=100)
    if not np.all(counts == n // 100):
        raise FlatnessError(bad + f"expected {n // 100} images per class, got {counts.min()}..{counts.max()}")
    return x, y.astype(np.int64)


def load_cifar100(root: str | os.PathLike[str] | None = None, download: bool | None = None) -> Splits:
    """CIFAR-100 (fine labels), pixels scaled to [0, 1] then standardised per channel.

    The channel means and standard deviations are those of the 50,000 training images. Inputs
    are flattened ``(N, 3072)`` float32 in the archive's channel-major order; labels int64.
    """
    root_path = data_dir(root)
    source = _cifar_source(root_path, download_allowed(download))
    parts = _read_cifar_parts(source)
    x_tr, y_tr = _check_cifar_part(source, "train", parts["train"], 50000)
    x_te, y_te = _check_cifar_part(source, "test", parts["test"], 10000)
    del parts
    scaled = np.arange(256, dtype=np.float32) / 255.0  # a lookup table is faster than a cast
    train = torch.from_numpy(scaled[x_tr].reshape(-1, 3, 1024))
    var, mean = torch.var_mean(train, dim=(0, 2), correction=0)
    mean_, std_ = mean[None, :, None], var.sqrt()[None, :, None]

    def standardise(pixels: Tensor) -> Tensor:
        return pixels.sub_(mean_).div_(std_).reshape(-1, 3072)

    test = torch.from_numpy(scaled[x_te].reshape(-1, 3, 1024))
    return Splits(
        standardise(train), torch.from_numpy(y_tr), standardise(test), torch.from_numpy(y_te), 100,
        pixel_mean=tuple(mean.tolist()), pixel_std=tuple(var.sqrt().tolist()),
    )


# --------------------------------------------------------------------------------------------
# 20 Newsgroups


def _canonical_order(filenames: Sequence[str], target: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """Sort documents by (newsgroup, message id): the same order whatever the source."""

    def key(i: int) -> tuple[str, int, str]:
        base = os.path.basename(str(filenames[i]))
        return (names[target[i]], int(base) if base.isdigit() else -1, base)

    return np.asarray(sorted(range(len(filenames)), key=key), dtype=np.int64)


def _from_bunch(bunch: Any) -> tuple[list[str], np.ndarray, list[str]]:
    target = np.asarray(bunch.target, dtype=np.int64)
    names = list(bunch.target_names)
    order = _canonical_order(bunch.filenames, target, names)
    return [bunch.data[i] for i in order], target[order], names


def _newsgroups_via_sklearn(home: Path, download: bool) -> tuple[Any, Any]:
    from sklearn.datasets import fetch_20newsgroups

    # scikit-learn prints (not raises) when its cache is damaged; keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        train = fetch_20newsgroups(
            data_home=str(home), subset="train", shuffle=False, download_if_missing=download
        )
        test = fetch_20newsgroups(
            data_home=str(home), subset="test", shuffle=False, download_if_missing=download
        )
    return train, test


def _newsgroups_from_archive(archive: Path) -> tuple[Any, Any]:
    from sklearn.datasets import load_files

    with tempfile.TemporaryDirectory(prefix="flatness-20news-") as tmp:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise FlatnessError(f"{archive} is corrupted ({_oneline(exc)})") from None
        parts = []
        for part in ("train", "test"):
            folder = Path(tmp) / f"20news-bydate-{part}"
            if not folder.is_dir():
                raise FlatnessError(f"{archive} is corrupted (it has no folder 20news-bydate-{part}/)")
            parts.append(load_files(str(folder), encoding="latin1"))
    return parts[0], parts[1]


def load_newsgroups_text(
    root: str | os.PathLike[str] | None = None, download: bool | None = None
) -> tuple[list[str], np.ndarray, list[str], np.ndarray, list[str]]:
    """20 Newsgroups "bydate" documents: ``(train_docs, train_y, test_docs, test_y, names)``.

    Documents are complete (headers included, as in scikit-learn's default) and in a canonical
    order (newsgroup, message id), so the sklearn cache and the raw archive give the same data.
    """
    root_path = data_dir(root)
    download = download_allowed(download)
    homes = [root_path / "scikit_learn_data", root_path]
    archive = root_path / NEWSGROUPS_ARCHIVE
    cache = next((h for h in homes if (h / NEWSGROUPS_CACHE).is_file()), None)
    try:
        if cache is not None:
            train, test = _newsgroups_via_sklearn(cache, download=False)
        elif archive.is_file():
            train, test = _newsgroups_from_archive(archive)
        elif download:
            train, test = _newsgroups_via_sklearn(homes[0], download=True)
        else:
            raise OSError("not found")
    except FlatnessError:
        raise
    except Exception as exc:  # sklearn raises OSError/URLError/zlib errors for missing or bad data
        if cache is not None:
            raise FlatnessError(
                f"{cache / NEWSGROUPS_CACHE} is corrupted ({type(exc).__name__}: "
                f"{_oneline(exc)}); delete it, or put {NEWSGROUPS_ARCHIVE} into {root_path}"
            ) from None
        raise FlatnessError(
            f"20 Newsgroups not found: put scikit-learn's cache {NEWSGROUPS_CACHE} into "
            f"{homes[0]}/ or the archive {NEWSGROUPS_ARCHIVE} into {root_path} (the data "
            f"directory: --data-dir, ${DATA_ENV} or ~/.cache/flatness)"
            + ("" if not download else f"; the download failed ({_oneline(exc)})")
        ) from None
    train_docs, train_y, names = _from_bunch(train)
    test_docs, test_y, test_names = _from_bunch(test)
    if names != test_names or len(names) != 20:
        raise FlatnessError("20 Newsgroups: expected the same 20 newsgroups in train and test")
    if len(train_docs) != 11314 or len(test_docs) != 7532:
        raise FlatnessError(
            f"20 Newsgroups: expected 11314 train / 7532 test documents, got "
            f"{len(train_docs)} / {len(test_docs)}"
        )
    return train_docs, train_y, test_docs, test_y, names


def scipy_to_torch_csr(matrix: Any) -> Tensor:
    """A scipy sparse matrix as a float32 torch CSR tensor (sorted column indices, no copy to dense)."""
    csr = matrix.tocsr().astype(np.float32)
    csr.sort_indices()
    with _quiet_sparse_beta():
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data),
            size=csr.shape,
            check_invariants=True,
        )


def load_newsgroups(
    root: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    *,
    min_df: int = 2,
    sublinear_tf: bool = True,
) -> Splits:
    """20 Newsgroups as sparse TF-IDF features (torch CSR), 20 classes.

    scikit-learn's ``TfidfVectorizer`` is fit on the training documents only. ``min_df=2`` drops
    words seen in a single training document (130,107 → about 56k features), ``sublinear_tf``
    uses 1 + log(tf); both are ordinary TF-IDF choices applied to every run alike.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    train_docs, train_y, test_docs, test_y, names = load_newsgroups_text(root, download)
    vectorizer = TfidfVectorizer(min_df=min_df, sublinear_tf=sublinear_tf, dtype=np.float32)
    x_train = vectorizer.fit_transform(train_docs)
    x_test = vectorizer.transform(test_docs)
    return Splits(
        scipy_to_torch_csr(x_train),
        torch.from_numpy(train_y),
        scipy_to_torch_csr(x_test),
        torch.from_numpy(test_y),
        len(names),
    )


def iterate_batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches ``(x[idx], y[idx])`` of a dense or sparse (CSR/COO) ``x``.

    With ``shuffle`` the order is a fresh permutation from ``generator`` (reproducible for a
    seeded generator); otherwise the data order. The last batch may be smaller unless
    ``drop_last``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = int(y.shape[0])
    if int(x.shape[0]) != n:
        raise ValueError(f"x has {x.shape[0]} rows but y has {n}")
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for idx in order.split(batch_size):
        if drop_last and len(idx) < batch_size:
            return
        if not shuffle and x.layout == torch.strided:
            start = int(idx[0])
            yield x[start : start + len(idx)], y[start : start + len(idx)]  # views, no copy
        else:
            yield select_rows(x, idx), y[idx]
