"""Train Paint by Example: ``python train.py [experiment=paper] [key=value ...]``.

With no arguments: the demo (generated data, tiny models, CPU, a few minutes). See README.
"""

import sys

import hydra
from omegaconf import DictConfig

import pbe_lightning.utils.resolvers  # noqa: F401  (${pbe.*}: Hydra resolves the run folder first)
from pbe_lightning.shutdown import SHUTDOWN
from pbe_lightning.stops import stops_as_errors
from pbe_lightning.utils.overrides import quote_brace_patterns


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from pbe_lightning.train import train  # after SHUTDOWN.install(): torch loads for seconds

    # A decided stop (every config mistake, a refused checkpoint, broken data, divergence):
    # "error: ..." lines naming the fix, exit 1; a bug keeps its traceback.
    with stops_as_errors():
        train(cfg)


if __name__ == "__main__":
    # First, so that a scheduler's signal during the imports is kept rather than fatal.
    SHUTDOWN.install()
    sys.argv = quote_brace_patterns(sys.argv)
    main()
