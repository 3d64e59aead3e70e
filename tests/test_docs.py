"""The documentation's machinery (docs/_ext): the missing-docstring gate, the resolution of
references, the generated task and results pages, and — with the docs extra installed — the
strict Sphinx build itself (without running the gallery; ``make docs`` runs it)."""

import importlib.metadata
import importlib.util
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "docs" / "_ext"
sys.path.insert(0, str(EXT))  # the extensions import each other, as under Sphinx

import api_pages  # noqa: E402
import results_pages  # noqa: E402
import task_pages  # noqa: E402

HAS_SPHINX = importlib.util.find_spec("sphinx") is not None


def test_every_public_module_and_name_has_a_docstring():
    problems = api_pages.missing_docstrings(api_pages.public_modules())
    assert problems == [], "\n".join(problems)


def test_public_modules_skip_private_ones_and_the_command_modules():
    modules = api_pages.public_modules()
    assert modules[0] == "flatness"
    assert {"flatness.measures", "flatness.methods.sam", "flatness.cli", "flatness.experiments"} <= set(
        modules
    )
    assert not [m for m in modules if "._" in m or m.startswith("flatness.cli.")]


def test_the_gate_reports_each_kind_of_missing_docstring(tmp_path, monkeypatch):
    package = tmp_path / "gatecheck"
    package.mkdir()
    (package / "__init__.py").write_text('"""A package."""\nfrom .mod import C, f\n__all__ = ["C", "f"]\n')
    (package / "mod.py").write_text(textwrap.dedent('''
        __all__ = ["C", "f", "documented"]

        def f():
            pass

        def documented():
            """Has one."""

        class C:
            """Has one."""

            def method(self):
                pass

            @property
            def prop(self):
                return 1

            def _private(self):
                pass
    '''))
    (package / "undeclared.py").write_text('"""No __all__."""\nVALUE = 1\n')
    (package / "rooms").mkdir()
    (package / "rooms" / "__init__.py").write_text('"""Submodules only: nothing to declare."""\n')
    (package / "_hidden.py").write_text("def g():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = api_pages.public_modules("gatecheck")
    assert modules == ["gatecheck", "gatecheck.mod", "gatecheck.rooms", "gatecheck.undeclared"]
    assert sorted(api_pages.missing_docstrings(modules)) == [
        "gatecheck.mod.C.method: no docstring",
        "gatecheck.mod.C.prop: no docstring",
        "gatecheck.mod.f: no docstring",
        "gatecheck.mod: module has no docstring",
        "gatecheck.undeclared: module has no __all__ (its public names are undeclared)",
    ]


def test_a_public_package_that_cannot_be_imported_fails_rather_than_vanishes(tmp_path, monkeypatch):
    package = tmp_path / "gatebroken"
    (package / "integration").mkdir(parents=True)
    (package / "__init__.py").write_text('"""A package."""\n')
    (package / "integration" / "__init__.py").write_text("import a_package_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="gatebroken.integration"):
        api_pages.public_modules("gatebroken")


def test_every_exported_name_is_documented_once_at_its_shortest_public_path():
    modules = api_pages.public_modules()
    homes = api_pages.canonical_homes(modules)
    assert homes[("flatness.penalties", "FlatnessPenalty")] == "flatness"
    assert homes[("flatness.measures.eigen", "top_eigenvalues")] == "flatness.measures"
    # a function named like a submodule is documented in the submodule, not beside it
    assert homes[("flatness.measures", "pac_bayes")] == "flatness.measures.pac_bayes"


def test_references_resolve_by_any_import_path_and_fail_on_nothing():
    api_pages.index_homes(api_pages.public_modules())
    assert api_pages.lookup("flatness.penalties.FlatnessPenalty") == (True, "flatness.FlatnessPenalty")
    assert api_pages.lookup("flatness.methods.base.Method.step") == (True, "flatness.methods.Method.step")
    top = "flatness.measures.top_eigenvalues"
    assert api_pages.lookup("flatness.measures.eigen.top_eigenvalues") == (True, top)
    # exists but documented nowhere (outside every __all__): shown as code, not an error
    assert api_pages.lookup("flatness.experiments.running.training._check_losses") == (True, None)
    assert api_pages.lookup("flatness.FlatnessPenalty.no_such_method") == (False, None)
    assert api_pages.lookup("flatness.no_such_module.thing") == (False, None)
    assert api_pages.lookup("torch.nn.Linear") == (False, None)


def test_task_pages_show_every_protocol_of_the_registry():
    from flatness.experiments.world.tasks import TASKS

    for name, task in TASKS.items():
        page = task_pages.task_page(task, results_pages.results_dirs())
        assert page.startswith(f"# `{name}`")
        (epochs_row,) = [line for line in page.splitlines() if line.startswith("| `epochs` |")]
        epochs = " | ".join(f"`{c.epochs}`" for c in task.protocols.values())
        assert epochs_row == f"| `epochs` | {epochs} |"


def test_results_pages_include_each_folders_reports_and_figures():
    folders = results_pages.results_dirs()
    assert {"breast-cancer-mlp", "cifar100-mlp/methods/compare", "cifar100-mlp/study/full"} <= set(folders)
    page = results_pages.folder_page("cifar100-mlp/methods/compare")
    folder = ROOT / "results" / "cifar100-mlp" / "methods" / "compare"
    for report in folder.glob("*.md"):
        assert f"```{{include}} ../../results/cifar100-mlp/methods/compare/{report.name}" in page
    for figure in folder.glob("*.png"):
        assert f"```{{figure}} ../../results/cifar100-mlp/methods/compare/{figure.name}" in page


@pytest.mark.skipif(not HAS_SPHINX, reason="the docs extra is not installed (make docs installs it)")
def test_the_docs_extra_is_installed_within_its_declared_ranges():
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["docs"]
    for req in map(Requirement, extra):
        version = importlib.metadata.version(req.name)
        assert req.specifier and req.specifier.contains(version, prereleases=True), (
            f"{req.name} {version} is installed but pyproject.toml declares {req}"
        )


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SPHINX, reason="the docs extra is not installed (make docs installs it)")
def test_the_site_builds_without_warnings(tmp_path):
    # every page but the gallery's executed output (make docs runs the examples)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", "-E", "-D", "plot_gallery=0",
           "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(tmp_path / "html")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "html" / "api" / "flatness.html").read_text().count("FlatnessPenalty") > 5
