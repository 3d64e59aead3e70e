"""Data loading: sparse row selection, validation split, CIFAR-100 / 20 Newsgroups readers."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from flatness.experiments import data as D
from flatness.utils import FlatnessError


def _random_csr(n: int = 9, d: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, d, generator=g) * (torch.rand(n, d, generator=g) < 0.35)
    dense[3] = 0  # an empty row
    return dense, dense.to_sparse_csr()


@pytest.mark.parametrize("layout", ["csr", "coo", "dense"])
def test_select_rows_matches_dense_indexing(layout):
    dense, csr = _random_csr()
    x = {"csr": csr, "coo": dense.to_sparse(), "dense": dense}[layout]
    idx = torch.tensor([8, 3, 0, 0, 5])  # any order, repeats, an empty row
    out = D.select_rows(x, idx)
    assert out.layout == x.layout
    assert torch.equal(out.to_dense(), dense[idx])


def test_split_validation_is_fixed_stratified_and_disjoint():
    full = D.load_breast_cancer()
    a = D.split_validation(full, 0.1, seed=0)
    b = D.split_validation(full, 0.1, seed=0)
    assert torch.equal(a.x_val, b.x_val) and torch.equal(a.x_train, b.x_train)
    assert a.x_train.shape[0] + a.x_val.shape[0] == 455 and a.x_val.shape[0] == 46
    # stratified: class shares agree to within one sample
    share = full.y_train.mean().item()
    assert abs(a.y_val.mean().item() - share) < 1.5 / 46
    rows = {tuple(r.tolist()) for r in a.x_train}
    assert not any(tuple(r.tolist()) in rows for r in a.x_val)
    assert D.split_validation(full, 0.0).x_val is None
    with pytest.raises(ValueError):
        D.split_validation(full, 1.0)


def test_breast_cancer_split_sizes():
    s = D.load_breast_cancer()
    assert s.x_train.shape == (455, 30) and s.x_test.shape == (114, 30)
    assert abs(float(s.x_train.mean())) < 1e-5  # standardised with training statistics


# ------------------------------------------------------------------------------------------
# CIFAR-100


def _cifar_pickle(n: int, seed: int, with_filenames: bool = False) -> bytes:
    rng = np.random.default_rng(seed)
    d = {
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "fine_labels": [i % 100 for i in range(n)],
        "coarse_labels": [i % 20 for i in range(n)],
        "batch_label": "fake",
    }
    if with_filenames:
        d["filenames"] = [f"img{i}.png" for i in range(n)]
    return pickle.dumps(d)


def _tar_with(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_cifar_reader_accepts_archive_and_folder_without_filenames(tmp_path):
    archive = tmp_path / "a" / D.CIFAR100_ARCHIVE
    archive.parent.mkdir()
    _tar_with(
        archive,
        {"cifar-100-python/train": _cifar_pickle(200, 0), "cifar-100-python/test": _cifar_pickle(100, 1, True)},
    )
    folder = tmp_path / "b" / D.CIFAR100_FOLDER
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(_cifar_pickle(200, 0))
    (folder / "test").write_bytes(_cifar_pickle(100, 1))
    for root in (tmp_path / "a", tmp_path / "b"):
        source = D._cifar_source(root, download=False)
        parts = D._read_cifar_parts(source)
        x, y = D._check_cifar_part(source, "train", parts["train"], 200)
        assert x.shape == (200, 3072) and x.dtype == np.uint8 and y.max() == 99


def test_cifar_structure_checks(tmp_path):
    bad_labels = {"data": np.zeros((200, 3072), np.uint8), "fine_labels": [100] * 200}
    with pytest.raises(FlatnessError, match="labels span"):
        D._check_cifar_part(tmp_path, "train", bad_labels, 200)
    bad_shape = {"data": np.zeros((200, 1024), np.uint8), "fine_labels": [0] * 200}
    with pytest.raises(FlatnessError, match="expected uint8"):
        D._check_cifar_part(tmp_path, "train", bad_shape, 200)
    unbalanced = {"data": np.zeros((200, 3072), np.uint8), "fine_labels": [0] * 200}
    with pytest.raises(FlatnessError, match="per class"):
        D._check_cifar_part(tmp_path, "train", unbalanced, 200)


def test_cifar_missing_and_corrupt_archives_give_clear_errors(tmp_path):
    with pytest.raises(FlatnessError, match=r"cifar-100-python\.tar\.gz.*into"):
        D.load_cifar100(tmp_path, download=False)
    (tmp_path / D.CIFAR100_ARCHIVE).write_bytes(b"\x1f\x8b this is not a gzip stream")
    with pytest.raises(FlatnessError, match="corrupted"):
        D.load_cifar100(tmp_path, download=False)
    _tar_with(tmp_path / D.CIFAR100_ARCHIVE, {"something/else": b"x"})
    with pytest.raises(FlatnessError, match=r"is corrupted \(it has no file cifar-100-python/train\)"):
        D.load_cifar100(tmp_path, download=False)


def test_truncated_cifar_archive_and_missing_member_say_corrupted(tmp_path):
    archive = tmp_path / D.CIFAR100_ARCHIVE
    _tar_with(archive, {"cifar-100-python/train": _cifar_pickle(200, 0)})  # no test part
    with pytest.raises(FlatnessError) as info:
        D.load_cifar100(tmp_path, download=False)
    assert str(info.value).startswith(f"{archive} is corrupted (it has no file cifar-100-python/test)")
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w:gz") as tar:
        for part, n in (("train", 200), ("test", 100)):
            payload = _cifar_pickle(n, 0)
            info_ = tarfile.TarInfo(f"cifar-100-python/{part}")
            info_.size = len(payload)
            tar.addfile(info_, io.BytesIO(payload))
    archive.write_bytes(full.getvalue()[: len(full.getvalue()) // 2])  # an interrupted copy
    with pytest.raises(FlatnessError) as info:
        D.load_cifar100(tmp_path, download=False)
    message = str(info.value)
    assert message.startswith(f"{archive} is corrupted (") and "\n" not in message
    assert "not found" not in message


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    folder = tmp_path / D.CIFAR100_FOLDER
    folder.mkdir()
    (folder / "train").write_bytes(pickle.dumps({"data": Evil()}))
    (folder / "test").write_bytes(_cifar_pickle(100, 1))
    with pytest.raises(FlatnessError, match="refusing"):
        D.load_cifar100(tmp_path, download=False)


def test_offline_download_failure_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(FlatnessError, match="download failed") as info:
        D.load_cifar100(tmp_path, download=True)
    assert str(tmp_path) in str(info.value) and D.CIFAR100_URL in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded left behind


def test_download_checks_md5_and_is_atomic(tmp_path, monkeypatch):
    payload = b"archive bytes" * 1000
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    dest = tmp_path / "file.tar.gz"
    with pytest.raises(FlatnessError, match="md5"):
        D._download("https://example.invalid/f", dest, md5="0" * 32)
    assert list(tmp_path.iterdir()) == []
    D._download("https://example.invalid/f", dest, md5=hashlib.md5(payload).hexdigest())
    assert dest.read_bytes() == payload and len(list(tmp_path.iterdir())) == 1


def test_offline_env_forbids_downloads(monkeypatch):
    monkeypatch.setenv(D.OFFLINE_ENV, "1")
    assert D.download_allowed() is False
    assert D.download_allowed(True) is True
    monkeypatch.setenv(D.OFFLINE_ENV, "0")
    assert D.download_allowed() is True


# ------------------------------------------------------------------------------------------
# 20 Newsgroups


def test_newsgroups_missing_and_corrupt_cache(tmp_path):
    with pytest.raises(FlatnessError, match=r"20news-bydate_py3\.pkz.*20news-bydate\.tar\.gz"):
        D.load_newsgroups_text(tmp_path, download=False)
    home = tmp_path / "scikit_learn_data"
    home.mkdir()
    (home / D.NEWSGROUPS_CACHE).write_bytes(b"not a zlib pickle")
    with pytest.raises(FlatnessError, match="corrupted"):
        D.load_newsgroups_text(tmp_path, download=False)


def test_newsgroups_archive_reader_and_canonical_order(tmp_path):
    docs = {
        "20news-bydate-train/sci.space/200": b"rockets",
        "20news-bydate-train/sci.space/13": b"orbit",
        "20news-bydate-train/alt.atheism/7": b"faith",
        "20news-bydate-test/sci.space/5": b"moon",
        "20news-bydate-test/alt.atheism/9": b"doubt",
    }
    archive = tmp_path / D.NEWSGROUPS_ARCHIVE
    _tar_with(archive, docs)
    train, test = D._newsgroups_from_archive(archive)
    texts, y, names = D._from_bunch(train)
    assert names == ["alt.atheism", "sci.space"]
    assert texts == ["faith", "orbit", "rockets"] and y.tolist() == [0, 1, 1]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / D.NEWSGROUPS_ARCHIVE).write_bytes(b"garbage")
    with pytest.raises(FlatnessError, match="corrupted"):
        D._newsgroups_from_archive(tmp_path / "bad" / D.NEWSGROUPS_ARCHIVE)
    # an archive without its test folder, and a truncated one
    partial = tmp_path / "partial" / D.NEWSGROUPS_ARCHIVE
    partial.parent.mkdir()
    _tar_with(partial, {k: v for k, v in docs.items() if "train" in k})
    with pytest.raises(FlatnessError) as info:
        D._newsgroups_from_archive(partial)
    assert str(info.value) == f"{partial} is corrupted (it has no folder 20news-bydate-test/)"
    cut = tmp_path / "cut" / D.NEWSGROUPS_ARCHIVE
    cut.parent.mkdir()
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(FlatnessError) as info:
        D._newsgroups_from_archive(cut)
    assert str(info.value).startswith(f"{cut} is corrupted (")


@pytest.mark.data
def test_real_newsgroups_cache_and_archive_agree(real_data_dir, tmp_path):
    cached = D.load_newsgroups_text(real_data_dir, download=False)
    (tmp_path / D.NEWSGROUPS_ARCHIVE).symlink_to(real_data_dir / D.NEWSGROUPS_ARCHIVE)
    from_archive = D.load_newsgroups_text(tmp_path, download=False)
    assert cached[0] == from_archive[0] and cached[2] == from_archive[2]
    assert np.array_equal(cached[1], from_archive[1]) and cached[4] == from_archive[4]
    assert len(cached[0]) == 11314 and len(cached[2]) == 7532


@pytest.mark.data
def test_real_newsgroups_tfidf_is_sparse(real_data_dir):
    s = D.load_newsgroups(real_data_dir, download=False)
    assert s.x_train.layout == torch.sparse_csr and s.x_test.layout == torch.sparse_csr
    assert s.x_train.shape[0] == 11314 and s.x_test.shape[1] == s.x_train.shape[1]
    assert s.x_train.values().numel() < 0.01 * s.x_train.shape[0] * s.x_train.shape[1]
    assert s.num_classes == 20 and int(s.y_train.max()) == 19


@pytest.mark.data
def test_real_cifar100_is_standardised_with_training_statistics(real_data_dir):
    s = D.load_cifar100(real_data_dir, download=False)
    assert s.x_train.shape == (50000, 3072) and s.x_test.shape == (10000, 3072)
    per_channel = s.x_train.view(-1, 3, 1024)
    assert torch.allclose(per_channel.mean(dim=(0, 2)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(per_channel.std(dim=(0, 2)), torch.ones(3), atol=1e-3)
    assert torch.bincount(s.y_test, minlength=100).eq(100).all()
