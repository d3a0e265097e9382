"""Summarising a Hydra sweep: ``python -m pbe_lightning.sweeps.summary multirun/train/<stamp>``.

``summary``: the command and ``summarise``; ``jobs``: finding a sweep's job folders and reading
each into a ``job.Job``: its ``variants`` (the overrides that differ), ``logs`` (metric series
from CSV, else W&B) and ``status``; ``table``: the metric to rank on, best points, the rows of
summary.md / summary.csv; ``plot``: summary.png; ``errors``: the one-line user error.
"""
