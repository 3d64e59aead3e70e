"""What an experiment is about: tasks and their protocols, data, models, architectures, augmentation.

Imports nothing from :mod:`flatness.experiments.running` or :mod:`flatness.experiments.reporting`.
"""
