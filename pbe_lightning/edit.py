"""Edit one photo with a trained checkpoint: paint the example object into the masked region.

    python -m pbe_lightning.edit --ckpt run/checkpoints/last.ckpt --image photo.jpg \\
        --mask mask.png --example object.jpg --out edited.png [--paste-back]

The mask file is white = edit, the size of the photo. The model sees a square around the mask's
bounding box (plus context), resized to its training resolution; a photo whose mask box does
not fit in a square inside it is used whole, resized (and resized back). Without
``--paste-back`` the output is that region as the model painted it, at the region's size; with
it, the full photo in which only the masked pixels change. Save as PNG to keep the unmasked
pixels exact (JPEG re-encodes all of them).

The checkpoint is read weights-only: one holding other objects (a tampered download) is
refused before anything in it runs; ``--trust-checkpoint`` loads it anyway, which lets it run
code: only for files whose origin you trust. Every argument mistake is listed at once.

From Python: ``pbe_lightning.inference`` (``load_editor``, ``edit_photo``) and
``pbe_lightning.images`` (``read_image``, ``read_user_mask``, ``save_atomically``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from pbe_lightning.images import read_image, read_user_mask, save_atomically
from pbe_lightning.inference import edit_photo, load_editor, pick_device
from pbe_lightning.models.samplers import SAMPLERS
from pbe_lightning.safe_load import add_trust_flag, trusted_files
from pbe_lightning.stops import RunStopped, stops_as_errors


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pbe_lightning.edit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keep the usage lines as written
    )
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint from train.py")
    parser.add_argument("--image", required=True, help="the photo to edit")
    parser.add_argument("--mask", required=True, help="white = edit, the photo's size")
    parser.add_argument("--example", required=True, help="an image of the object to paint in")
    parser.add_argument("--out", required=True, help="output file (PNG keeps pixels exact)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS))
    parser.add_argument("--paste-back", action="store_true", help="write the full photo")
    parser.add_argument("--feather", type=float, default=0.0, help="blend radius in px, inwards")
    parser.add_argument("--context", type=float, default=0.3, help="margin / mask box side")
    parser.add_argument("--resolution", type=int, default=None, help="default: the training one")
    parser.add_argument("--device", default="auto")
    add_trust_flag(parser)
    return parser


def argument_problems(args: argparse.Namespace) -> list[str]:
    """Every argument that cannot work, one line each naming the flag and the fix."""
    problems = [
        f"--{flag} {getattr(args, flag)}: no such file"
        for flag in ("ckpt", "image", "mask", "example")
        if not Path(getattr(args, flag)).is_file()
    ]
    numbers = (
        ("steps", args.steps >= 1, "a whole number >= 1, e.g. --steps 50"),
        ("guidance", args.guidance >= 0, "a number >= 0, e.g. --guidance 5 (1: no guidance)"),
        ("feather", args.feather >= 0, "a number of pixels >= 0"),
        ("context", args.context >= 0, "a fraction of the mask box >= 0, e.g. --context 0.3"),
        ("resolution", (args.resolution or 1) >= 1, "a number of pixels, or leave it out"),
    )
    problems += [
        f"--{flag} {getattr(args, flag)} must be {must}" for flag, ok, must in numbers if not ok
    ]
    if Path(args.out).suffix.lower() not in Image.registered_extensions():
        problems.append(f"--out {args.out}: name an image file, e.g. edited.png")
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    with stops_as_errors():
        problems = argument_problems(args)
        if problems:
            raise RunStopped("\n".join(problems))
        try:
            photo = read_image(args.image, upright=True)
            user_mask = read_user_mask(args.mask, (photo.shape[-1], photo.shape[-2]))
            example = read_image(args.example, upright=True)
            with trusted_files(args.ckpt if args.trust_checkpoint else None):
                device = pick_device(args.device)
                module, resolution = load_editor(args.ckpt, device, args.resolution)
        except (FileNotFoundError, ValueError) as error:  # unreadable images, a bad mask
            raise RunStopped(str(error)) from None
    options = ("steps", "guidance", "seed", "sampler", "paste_back", "feather", "context")
    edited = edit_photo(
        module, resolution, photo, user_mask, example, **{k: getattr(args, k) for k in options}
    )
    save_atomically(edited, args.out)
    print(f"wrote {args.out} ({edited.shape[-1]}x{edited.shape[-2]})")


if __name__ == "__main__":
    main()
