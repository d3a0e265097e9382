"""Export a trained checkpoint for use outside pbe-lightning, in one of two formats.

``--format diffusers`` (default): a stock diffusers ``PaintByExamplePipeline`` folder
(``model_index.json``, ``vae/``, ``unet/``, ``image_encoder/``, ``scheduler/``,
``feature_extractor/``) that runs with diffusers + transformers alone (``convert.pipeline``).

``--format official``: one file in the official Paint-by-Example release's layout (LDM names:
``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``, ``proj_out``,
``learnable_vector``; ``convert.official``). ``.safetensors`` holds the tensors;
``.ckpt`` holds ``{"state_dict": tensors}``, what the official repository's scripts
``torch.load``. Both go back into training with ``experiment=finetune model.init_from=FILE``.

Both hold Paint-by-Example's CLIP ViT exemplar tower: a model trained with another tower
(``model.encoder.family=siglip|dinov2``) is refused in one line; its Lightning checkpoint is
what ``edit`` and ``evaluate.py`` read.

``--ema`` exports the EMA weights a run trained with ``callbacks=ema`` stored in its checkpoint.

The checkpoint is read weights-only (``safe_load``): one holding other objects is refused before
anything in it runs; ``--trust-checkpoint`` loads it anyway, which lets it run code.

``--wandb-artifact [NAME]`` then logs the export as a W&B artifact of type ``model`` (default
name ``pipeline-<training run id>`` or ``official-<training run id>``, ``-ema`` added; aliases
``latest``, ``step-N``) from a run with ``job_type=export`` in the training run's group
(``utils/loggers.py``: ``log_export_artifact``); offline when the training run was.

    python -m pbe_lightning.export --ckpt run/checkpoints/last.ckpt --out exported [--ema]
    python -m pbe_lightning.export --ckpt run/checkpoints/last.ckpt --format official \\
        --out model.safetensors [--ema] [--wandb-artifact]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from pbe_lightning.callbacks.ema import EMA_KEY
from pbe_lightning.convert.official import to_official_layout
from pbe_lightning.convert.pipeline import build_pipeline, check_clip_family, save_pipeline
from pbe_lightning.models.build import load_trained
from pbe_lightning.models.module import PaintByExampleModule
from pbe_lightning.safe_load import add_trust_flag, load_checkpoint, trusted_files
from pbe_lightning.stops import RunStopped, stops_as_errors
from pbe_lightning.utils.loggers import log_export_artifact

FORMATS = ("diffusers", "official")
OFFICIAL_SUFFIXES = (".safetensors", ".ckpt")


# -- weights ---------------------------------------------------------------------------------
def ema_weights(module: PaintByExampleModule, checkpoint: Mapping) -> dict[str, torch.Tensor]:
    """The checkpoint's EMA weights, checked against the module (module state-dict names).

    Every trainable parameter must have an EMA value: a half-EMA export would silently mix
    two models.
    """
    ema = checkpoint.get(EMA_KEY)
    if ema is None:
        raise ValueError(
            f"the checkpoint has no {EMA_KEY!r} entry, so there are no EMA weights to export: "
            "export without --ema, or train with EMA enabled"
        )
    state = module.state_dict()
    unknown = sorted(set(ema) - set(state))
    if unknown:
        raise ValueError(f"EMA weights for parameters this model does not have: {unknown[:5]}")
    trainable = {id(p) for p in module.trainable_parameters()}
    missing = sorted(
        name for name, p in module.named_parameters() if id(p) in trainable and name not in ema
    )
    if missing:
        raise ValueError(
            f"{len(missing)} trainable parameters lack EMA weights, e.g. {missing[:5]}"
        )
    for name, value in ema.items():
        if value.shape != state[name].shape:
            raise ValueError(
                f"EMA {name} has shape {tuple(value.shape)}, the model {tuple(state[name].shape)}"
            )
    return {name: value.to(state[name].dtype) for name, value in ema.items()}


def _replacements(
    module: PaintByExampleModule, ema: bool, checkpoint: Mapping | None
) -> dict[str, torch.Tensor]:
    """The weights to write instead of the module's own: EMA ones, or none."""
    if not ema:
        return {}
    if checkpoint is None:
        raise ValueError("ema=True needs the training checkpoint (checkpoint=load_checkpoint(...))")
    return ema_weights(module, checkpoint)


# -- the formats -----------------------------------------------------------------------------
def export_pipeline(
    module: PaintByExampleModule,
    out_dir: str | Path,
    ema: bool = False,
    checkpoint: Mapping | None = None,
) -> Path:
    """Write ``module`` as a ``PaintByExamplePipeline`` folder; returns the folder.

    ``ema=True`` exports the EMA weights stored under ``checkpoint["pbe_ema"]`` (the dict the
    module was loaded from) instead of the module's own trainable weights.
    """
    replace = _replacements(module, ema, checkpoint)
    pipe = build_pipeline(
        module.unet, module.vae, module.encoder, module.noise_scheduler, replace=replace
    )
    return save_pipeline(pipe, out_dir)


def export_official(
    module: PaintByExampleModule,
    out_file: str | Path,
    ema: bool = False,
    checkpoint: Mapping | None = None,
) -> Path:
    """Write ``module`` as one file in the official release's layout; returns the file.

    ``.safetensors``: the tensors; ``.ckpt``: ``{"state_dict": tensors}`` (the official
    repository's loader). ``ema`` and ``checkpoint`` as in :func:`export_pipeline`.
    """
    out = Path(out_file)
    if out.suffix not in OFFICIAL_SUFFIXES:
        raise ValueError(
            f"cannot write the official layout to {out}: name a {OFFICIAL_SUFFIXES} file "
            "(e.g. --out model.safetensors)"
        )
    check_clip_family(module.encoder, "the official single-file layout")
    replace = _replacements(module, ema, checkpoint)
    state = to_official_layout(module.unet, module.vae, module.encoder, replace=replace)
    # safetensors takes neither strided views nor tensors sharing memory.
    state = {k: v.detach().contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_file(state, out, metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state}, out)
    return out


# -- command line ----------------------------------------------------------------------------
def export_checkpoint(
    ckpt: str | Path, out: str | Path, ema: bool = False, format: str = "diffusers"
) -> Path:
    """A Lightning checkpoint written by ``train.py`` -> a pipeline folder or an official file."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}: use one of {FORMATS}")
    module = load_trained(str(ckpt))
    # mmap: only the EMA tensors are read, not a second copy of the whole checkpoint.
    checkpoint = load_checkpoint(ckpt, mmap=True) if ema else None
    if format == "official":
        return export_official(module, out, ema=ema, checkpoint=checkpoint)
    return export_pipeline(module, out, ema=ema, checkpoint=checkpoint)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pbe_lightning.export",
        description=(
            "Export a pbe-lightning checkpoint as a PaintByExamplePipeline folder (diffusers) or "
            "as one file in the official Paint-by-Example layout (official)."
        ),
    )
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint written by train.py")
    parser.add_argument(
        "--out",
        required=True,
        help="diffusers: the folder to write; official: the .safetensors or .ckpt file to write",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="diffusers",
        help="diffusers: a stock PaintByExamplePipeline folder (default); official: the official "
        "release's single-file LDM layout, which experiment=finetune model.init_from=FILE reads",
    )
    parser.add_argument("--ema", action="store_true", help="export the EMA weights (pbe_ema)")
    parser.add_argument(
        "--wandb-artifact",
        nargs="?",
        const="",
        default=None,
        metavar="NAME",
        help="also log the export as a W&B artifact of type model (default NAME: pipeline-<run "
        "id> or official-<run id>) from a job_type=export run in the training run's group; "
        "offline when the training run was or WANDB_MODE=offline",
    )
    add_trust_flag(parser)
    return parser


def argument_problems(args: argparse.Namespace) -> list[str]:
    """Every argument that cannot work, one line each naming the flag and the fix."""
    problems = [] if Path(args.ckpt).is_file() else [f"--ckpt {args.ckpt}: no such file"]
    suffix = Path(args.out).suffix
    if args.format == "official" and suffix not in OFFICIAL_SUFFIXES:
        problems.append(
            f"--out {args.out}: --format official writes one file, name it *.safetensors "
            "(the tensors) or *.ckpt (a state_dict, for the official repository's scripts)"
        )
    if args.format == "diffusers" and suffix in OFFICIAL_SUFFIXES:
        problems.append(
            f"--out {args.out} names a file, the diffusers format writes a folder: "
            "add --format official for the single-file layout, or name a folder"
        )
    return problems


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    with stops_as_errors(), trusted_files(args.ckpt if args.trust_checkpoint else None):
        problems = argument_problems(args)
        if problems:
            raise RunStopped("\n".join(problems))
        try:
            out = export_checkpoint(args.ckpt, args.out, args.ema, args.format)
        except ValueError as error:  # no EMA in it, an architecture the format cannot hold
            raise RunStopped(str(error)) from None
        print(f"exported {args.ckpt} -> {out} ({args.format})")
        if args.wandb_artifact is not None:
            name, run = log_export_artifact(
                out, args.ckpt, args.format, args.ema, args.wandb_artifact or None
            )
            print(f"logged W&B artifact {name} from the run in {run}")


if __name__ == "__main__":
    main()
