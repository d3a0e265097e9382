"""Evaluate a checkpoint on a COCOEE benchmark: ``python evaluate.py ckpt_path=... benchmark=...
real_images=... [qs_model=qs.npz] [trust_checkpoint=true] [key=value ...]``. See
pbe_lightning/evaluate.py and README.

Every config mistake is listed at once (``error: ...`` lines, exit 1) before anything loads; a
checkpoint holding more than tensors is refused unless ``trust_checkpoint=true``.
"""

import hydra
from omegaconf import DictConfig

from pbe_lightning.evaluate import evaluate
from pbe_lightning.safe_load import TRUST_FIX, check_loadable, trusted_files
from pbe_lightning.stops import stops_as_errors
from pbe_lightning.utils.eval_checks import check_eval_config


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with stops_as_errors():
        check_eval_config(cfg)
        trusted = cfg.ckpt_path if cfg.get("trust_checkpoint") is True else None
        with trusted_files(trusted):
            check_loadable(
                cfg.ckpt_path, TRUST_FIX
            )  # refused here, before the metrics' models load
            if cfg.get("inception_weights"):  # torch-fidelity reads it itself: checked first
                check_loadable(cfg.inception_weights)
            evaluate(cfg)


if __name__ == "__main__":
    main()
