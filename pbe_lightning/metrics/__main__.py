"""``python -m pbe_lightning.metrics ...``: see :mod:`pbe_lightning.metrics.cli`."""

from pbe_lightning.metrics.cli import main

main()
