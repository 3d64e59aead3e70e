"""The documentation's machinery (docs/_ext): the missing-docstring gate, the resolution of
references, the generated task and results pages, and — with the docs extra installed — the
strict Sphinx build itself (without running the gallery; ``make docs`` runs it).
"""

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
import readme_figure  # noqa: E402
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



def test_the_readme_is_short_and_its_figure_is_a_committed_gallery_image():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200
    figures = readme_figure.readme_figures()
    assert figures, "the README shows no figure"
    assert readme_figure.figure_problems() == []
    for rel in figures:  # the caption names the example the figure comes from
        example = readme_figure._GALLERY_NAME.fullmatch(Path(rel).name).group(1)
        assert f"docs/gallery/{example}.py" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_the_figure_check_reports_a_figure_without_its_example(tmp_path):
    (tmp_path / "docs" / "_static").mkdir(parents=True)
    (tmp_path / "docs" / "gallery").mkdir()
    (tmp_path / "docs" / "gallery" / "plot_01_kept.py").write_text("")
    committed = ROOT / readme_figure.readme_figures()[0]
    for name in ("sphx_glr_plot_01_kept_001.png", "sphx_glr_plot_09_gone_001.png", "landscape.png"):
        (tmp_path / "docs" / "_static" / name).write_bytes(committed.read_bytes())
    readme = tmp_path / "README.md"
    readme.write_text("![a](docs/_static/sphx_glr_plot_01_kept_001.png)\n![b](docs/_static/sphx_glr_plot_09_gone_001.png)\n"
                      "![c](docs/_static/landscape.png)\n![d](docs/_static/sphx_glr_plot_01_kept_002.png)\n")
    assert readme_figure.figure_problems(readme, tmp_path) == [
        "README figure docs/_static/sphx_glr_plot_09_gone_001.png: its example docs/gallery/plot_09_gone.py "
        "does not exist",
        "README figure docs/_static/landscape.png: not named sphx_glr_plot_NAME_00K.png after a gallery example",
        "README figure docs/_static/sphx_glr_plot_01_kept_002.png: no such file",
    ]
    # after a build that ran the gallery: a figure it no longer draws, or draws at another size
    drawn = tmp_path / "drawn"
    drawn.mkdir()
    header = committed.read_bytes()
    width, height = readme_figure.png_size(committed)
    resized = header[:16] + (width + 1).to_bytes(4, "big") + height.to_bytes(4, "big") + header[24:]
    (drawn / "sphx_glr_plot_01_kept_001.png").write_bytes(resized)
    readme.write_text("![a](docs/_static/sphx_glr_plot_01_kept_001.png)\n![b](docs/_static/sphx_glr_plot_09_gone_001.png)\n")
    problems = readme_figure.drawn_problems(drawn, readme, tmp_path)
    assert len(problems) == 2 and "run `make readme-figure`" in problems[0] and "drew no" in problems[1]
    (drawn / "sphx_glr_plot_01_kept_001.png").write_bytes(header)
    assert readme_figure.drawn_problems(drawn, readme, tmp_path) == [problems[1]]

@pytest.mark.slow
@pytest.mark.skipif(not HAS_SPHINX, reason="the docs extra is not installed (make docs installs it)")
def test_the_site_builds_without_warnings(tmp_path):
    # every page but the gallery's executed output (make docs runs the examples)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q", "-E", "-D", "plot_gallery=0",
           "-d", str(tmp_path / "doctrees"), str(ROOT / "docs"), str(tmp_path / "html")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "html" / "api" / "flatness.html").read_text().count("FlatnessPenalty") > 5
