"""Evaluate a checkpoint on a COCOEE benchmark: ``python evaluate.py ckpt_path=... benchmark=...
real_images=... [qs_model=qs.npz] [key=value ...]``. See pbe_lightning/evaluate.py and README.
"""

import hydra
from omegaconf import DictConfig

from pbe_lightning.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
