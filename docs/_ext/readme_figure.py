"""The README's figure is a committed copy of an image the gallery draws.

``README.md`` shows ``docs/_static/sphx_glr_plot_NN_name_00K.png``: sphinx-gallery's own name for
figure K of the example ``docs/gallery/plot_NN_name.py``, so the file name says where it comes
from. ``make readme-figure`` refreshes the copy after ``make docs``. This extension fails the
build (a warning, an error under ``-W``) when a figure the README shows is not committed, names
no gallery example, or names one that does not exist; and, when the build has executed the
gallery, when that example no longer draws that figure or draws it at another size.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

from sphinx.util import logging

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
STATIC = ROOT / "docs" / "_static"
GALLERY = ROOT / "docs" / "gallery"
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_GALLERY_NAME = re.compile(r"sphx_glr_(plot_\w+?)_(\d{3})\.png")

logger = logging.getLogger(__name__)


def readme_figures(readme: Path = README) -> list[str]:
    """The image paths (relative to the repository root) that ``readme`` shows."""
    return _IMAGE.findall(readme.read_text(encoding="utf-8"))


def figure_problems(readme: Path = README, root: Path = ROOT) -> list[str]:
    """What is wrong with the README's figures, one line each (empty: nothing)."""
    problems = []
    for rel in readme_figures(readme):
        path = root / rel
        match = _GALLERY_NAME.fullmatch(path.name)
        if path.parent != root / "docs" / "_static":
            problems.append(f"README figure {rel}: not under docs/_static/")
        if not path.is_file():
            problems.append(f"README figure {rel}: no such file")
        if match is None:
            problems.append(f"README figure {rel}: not named sphx_glr_plot_NAME_00K.png after a gallery example")
        elif not (root / "docs" / "gallery" / f"{match.group(1)}.py").is_file():
            problems.append(f"README figure {rel}: its example docs/gallery/{match.group(1)}.py does not exist")
    return problems


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file, from its header."""
    with path.open("rb") as fh:
        head = fh.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def drawn_problems(drawn_dir: Path, readme: Path = README, root: Path = ROOT) -> list[str]:
    """Compare each README figure with the image the gallery drew into ``drawn_dir``."""
    problems = []
    for rel in readme_figures(readme):
        committed, drawn = root / rel, drawn_dir / Path(rel).name
        if not drawn.is_file():
            problems.append(f"README figure {rel}: the gallery drew no {drawn.name} (figure renumbered or gone?)")
        elif committed.is_file() and png_size(committed) != png_size(drawn):
            problems.append(f"README figure {rel}: {png_size(committed)} pixels, the gallery draws "
                            f"{png_size(drawn)}; run `make readme-figure`")
    return problems


def _builder_inited(app: Any) -> None:
    for problem in figure_problems():
        logger.warning(problem)


def _build_finished(app: Any, exception: Exception | None) -> None:
    if exception is None and app.config.sphinx_gallery_conf.get("plot_gallery") not in (False, "False", "0"):
        for problem in drawn_problems(Path(app.srcdir) / "auto_examples" / "images"):
            logger.warning(problem)


def setup(app: Any) -> dict[str, Any]:
    """Sphinx entry point: check the README's figures before and after the build."""
    app.connect("builder-inited", _builder_inited)
    app.connect("build-finished", _build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
