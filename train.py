"""Train Paint by Example: ``python train.py [experiment=paper] [key=value ...]``.

With no arguments: the demo (generated data, tiny models, CPU, a few minutes). See README.
"""

import sys

import hydra
from omegaconf import DictConfig

from pbe_lightning.cli import quote_brace_patterns
from pbe_lightning.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    sys.argv = quote_brace_patterns(sys.argv)
    main()
