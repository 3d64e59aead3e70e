"""Integrations with training frameworks, each in its own module and importing its framework.

:mod:`.lightning` (PyTorch Lightning: ``pip install 'flatness[lightning]'``) and :mod:`.hf` (Hugging
Face ``transformers.Trainer``: ``pip install 'flatness[hf]'``). ``import flatness`` imports neither;
this package imports nothing.
"""
