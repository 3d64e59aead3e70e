"""
A small study: which measures rank the generalisation gap?
==========================================================

``flatness study TASK`` trains a population of models over a declared grid of hyper-parameters,
measures every model with every measure of :mod:`flatness.measures` (and Jiang et al.'s
reference measures), and ranks the measures by Kendall's τ with the generalisation gap, with
scatter plots per grid axis. The project's grids are crossed factorial designs of 32 to 192
models, each trained to a stopping rule (``flatness study TASK --list`` shows them); this page
runs the smallest population the report accepts in a build: four Breast Cancer MLPs (two
learning rates × plain training and FA at λ = 0.1, 3 epochs, a quarter of the task's width),
through the same functions the command calls. Four models make no statistics — τ over four
points takes five values — so read it as a tour of the outputs.
"""

# %%
# The grid and the runs
# ---------------------
# A :class:`~flatness.experiments.reporting.study.StudyGrid` crosses its ``factors`` fully and
# gives every other axis its ``fixed`` value; ``seeds`` are replicates of every setting, and
# ``protocol`` overrides the task's training protocol. The runs are ordinary runs of the
# pipeline (records, checkpoints, resumable).
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

from flatness.experiments.reporting.study import StudyGrid
from flatness.experiments.reporting.study_report import write_study_report
from flatness.experiments.running.runner import run_grid
from flatness.experiments.running.study_population import collect_population

grid = StudyGrid(
    "gallery", "breast-cancer-mlp",
    factors={"lr": (1e-3, 3e-3), "method": ("none", "fa:0.1")},
    fixed={"batch_size": 32, "width": 0.25, "weight_decay": 0.0, "dropout": 0.3},
    seeds=(0,),
    protocol={"epochs": 3},
    description="the gallery's population: 2 lr x 2 methods, one seed, 3 epochs",
)
entries = grid.entries()
for spec, settings in entries:
    print(spec.name, settings)

with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    run_grid([spec for spec, _ in entries], out, progress=False, log=lambda message: None)
    population = collect_population(grid, entries, out)
    report_dir = out / "breast-cancer-mlp" / "study" / grid.name
    text = write_study_report(population, grid, report_dir, resamples=200)
    scatter = plt.imread(report_dir / "scatter_lr.png")

# %%
# The ranking
# -----------
# The head of ``ranking.md``: per measure, τ with the gap (and with test accuracy), bootstrap
# intervals, and the granulated coefficient per axis.
print("\n".join(text.splitlines()[:24]))

# %%
# The scatter plot
# ----------------
# Each measure against the generalisation gap, one point per model, coloured by the learning
# rate (``scatter_lr.png``; the study writes one per varied axis).
fig, ax = plt.subplots(figsize=(10, 7))
ax.imshow(scatter)
ax.set_axis_off()
fig.tight_layout()
plt.show()
