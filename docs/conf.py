"""Sphinx configuration of the flatness documentation (``make docs``; see docs/README.md).

Nothing here reaches the network: no intersphinx, no remote assets at build time (MathJax is
loaded by the reader's browser). Warnings are errors in ``make docs`` (``-W --keep-going``).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("MPLBACKEND", "agg")

import torch  # noqa: E402

import flatness  # noqa: E402

# The gallery's examples run in this process. One thread: on a shared 2-core machine (CI) two
# threads spin against other jobs and a small model's step takes ~20x longer.
torch.set_num_threads(1)

project = "flatness"
author = "the flatness developers"
copyright = "the flatness developers"  # noqa: A001
version = release = flatness.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
    "sphinxarg.ext",
    "api_pages",  # the API reference from __all__, and the missing-docstring gate
    "results_pages",  # results/README.md and a page per folder of committed results
    "task_pages",  # one page per built-in task, from the task registry
    "registry_tables",  # the methods and measures tables of the guide, from their registries
    "readme_figure",  # the README's figure: a committed copy of a gallery image, checked
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "gallery", "**/README.txt", "auto_examples/*.ipynb", "auto_examples/*.py"]
templates_path: list[str] = []

# Broken cross-references are build errors. Names outside this project cannot be resolved
# without intersphinx (no network at build time), so references into them are not checked.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|numpy|np|scipy|matplotlib|collections|typing|typing_extensions|argparse|platform|"
               r"os|pathlib|concurrent|contextlib|dataclasses|enum|types|io|json|random|threading|"
               r"lightning|pytorch_lightning|transformers|accelerate|tensorboard)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|nn\..*|Generator|Path|PathLike|Callable|Iterable|Iterator|Sequence|"
               r"Mapping|MutableMapping|Any|Literal|IO|ndarray|Figure|Axes|Namespace|Self)"),
    (r"py:class", r"(int|float|str|bool|bytes|dict|list|tuple|set|frozenset|object|type|None|"
                  r"complex|slice|Ellipsis|NoneType|FloatingPointError|ValueError|RuntimeError|"
                  r"Exception|KeyError|TypeError)"),
]

# autodoc / napoleon: Google-style docstrings, documented in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"exclude-members": "__init__, __new__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autosummary_generate = False  # the pages are written by api_pages (one per public module)

# MyST: the Markdown pages of the repository are included as they are.
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

sphinx_gallery_conf = {
    "examples_dirs": "gallery",
    "gallery_dirs": "auto_examples",
    "filename_pattern": re.escape(os.sep) + "plot_",  # every plot_*.py is executed
    "within_subsection_order": "FileNameSortKey",
    "doc_module": ("flatness",),
    "backreferences_dir": "gen_modules/backreferences",
    "reference_url": {"flatness": None},
    "remove_config_comments": True,
    "matplotlib_animations": False,
    "abort_on_example_error": False,  # run them all, then fail the build on any error
    "only_warn_on_example_error": False,
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "capture_repr": ("_repr_html_", "__repr__"),
}

html_theme = "furo"
html_title = f"flatness {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
