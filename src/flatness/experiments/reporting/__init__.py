"""Reading runs: statistics, groups of records, tables, plots and reports.

The reports: ``report``, ``compare``, equal compute and the generalisation study's report.

Builds on :mod:`flatness.experiments.running` and :mod:`flatness.experiments.world`.
"""
