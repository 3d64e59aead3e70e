"""The declared dependency ranges are the ones the tests run with, and nothing undeclared is used."""

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


EXTRAS = ("test", "lightning", "hf", "tensorboard")  # what `make install` installs ("all" + "test")


def _declared() -> list[Requirement]:
    """The requirements of the installed ``flatness`` metadata, with the extras ``make install``
    installs (``all`` is the other three, by reference).

    When the installed metadata belongs to another version (an older editable install of a
    different checkout), this tree's ``pyproject.toml`` is read instead.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    try:
        installed = importlib.metadata.distribution("flatness")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed is not None and installed.version == project["version"]:
        reqs = [Requirement(r) for r in installed.requires or []]
        return [
            r for r in reqs
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in EXTRAS)
        ]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *(d for e in EXTRAS for d in extras[e])]]


def test_the_all_extra_is_the_three_integrations():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (only,) = extras["all"]
    assert Requirement(only).name == "flatness"
    assert Requirement(only).extras == {"lightning", "hf", "tensorboard"}


def test_every_installed_dependency_satisfies_its_declared_range():
    declared = _declared()
    assert {r.name for r in declared} >= {
        "torch", "numpy", "scipy", "scikit-learn", "lightning", "transformers", "accelerate", "tensorboard"
    }
    for req in declared:
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), (
            f"{req.name} {version} is installed but pyproject.toml declares {req}"
        )
        assert req.specifier, f"{req.name} has no declared range"


def test_curvlinops_is_no_dependency_and_is_never_imported():
    declared = {r.name for r in _declared()}
    assert not declared & {"curvlinops-for-pytorch", "backpack-for-pytorch", "torchvision"}
    code = (
        "import sys, torch; from torch import nn; import flatness, flatness.measures as m;"
        "import flatness.experiments, flatness.cli;"
        "model = nn.Linear(3, 2);"
        "data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))];"
        "m.top_eigenvalues(model, nn.functional.cross_entropy, data, k=1);"
        "m.spectral_density(model, nn.functional.cross_entropy, data, num_steps=4);"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('curvlinops', 'backpack'));"
        "print(bad); assert not bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
