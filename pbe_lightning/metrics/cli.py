"""``python -m pbe_lightning.metrics``: the QS mixture (import the authors', or fit one) and
the metrics of folders of images.

    python -m pbe_lightning.metrics import-gmm coco2017_gmm_k20 --out qs_gmm.npz
    python -m pbe_lightning.metrics fit-qs --real test_set_GT --clip ViT-B-32-quickgelu \\
        --checkpoint /weights/clip-vit-b-32/open_clip_pytorch_model.bin --out qs.npz
    python -m pbe_lightning.metrics qs --images edits --model qs_gmm.npz --clip ... [--percentile]
    python -m pbe_lightning.metrics fid --real test_set_GT --images edits --clip ... [--normalised]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from pbe_lightning.images import image_files
from pbe_lightning.metrics.features import ClipFeatures, folder_features, unit
from pbe_lightning.metrics.fid import frechet_distance
from pbe_lightning.metrics.gmm import save_quality_model
from pbe_lightning.metrics.gmm_fit import fit_quality_model, holdout_size
from pbe_lightning.metrics.gmm_import import RefusedPickle, mixture_from_sklearn, read_sklearn_gmm
from pbe_lightning.metrics.quality import (
    load_quality_model_for,
    paper_quality_score,
    percentile_quality_score,
)

PAPER_CLIP = "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32, the public tools' clip.load("ViT-B/32")


def load_clip(args: argparse.Namespace) -> ClipFeatures:
    return ClipFeatures.load(args.clip, args.checkpoint).to(args.device)


def fit_qs_command(args: argparse.Namespace) -> None:
    try:
        count = len(image_files(args.real))
    except (FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"fit-qs: --real {args.real}: {error}") from None
    fitted = count - holdout_size(count, args.holdout)  # as fit_quality_model splits them
    if not 1 <= args.k <= fitted:
        raise SystemExit(
            f"fit-qs: {count} images in {args.real} ({fitted} to fit after --holdout "
            f"{args.holdout}) cannot fit --k {args.k} components: lower --k (at most {fitted}) "
            "or add images"
        )
    features = folder_features(args.real, load_clip(args), args.batch_size)
    if args.features == "normalised":
        features = unit(features)
    model = fit_quality_model(features, args.k, args.seed, args.holdout, covariance=args.covariance)
    model.clip, model.features = args.clip, args.features
    save_quality_model(model, args.out)
    print(f"fitted k={args.k} on {len(features)} images ({model.reference.size} held out)")


def import_gmm_command(args: argparse.Namespace) -> None:
    try:
        model = mixture_from_sklearn(read_sklearn_gmm(args.pickle), args.clip)
    except FileNotFoundError:
        raise SystemExit(f"import-gmm: {args.pickle}: no such file") from None
    except RefusedPickle as error:
        raise SystemExit(f"import-gmm: {args.pickle}: {error}") from None
    model.source = f"import-gmm {args.pickle.rsplit('/', 1)[-1]}"
    save_quality_model(model, args.out)
    k, d = model.means.shape
    print(
        f"wrote {args.out}: k={k} {model.covariance_type} components over {d}-d {args.clip} features"
    )


def qs_command(args: argparse.Namespace) -> None:
    try:
        model = load_quality_model_for(args.model, args.clip, "--model")
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"qs: {error}") from None
    features = folder_features(args.images, load_clip(args), args.batch_size)
    if model.features == "normalised":
        features = unit(features)
    log_likelihoods = model.log_likelihood(features)
    if args.percentile:
        try:
            value = percentile_quality_score(log_likelihoods, model.reference)
        except ValueError as error:
            raise SystemExit(f"qs: {error}") from None
        print(f"qs_percentile {value:.2f}")
    else:
        print(f"qs {paper_quality_score(log_likelihoods):.2f}")


def fid_command(args: argparse.Namespace) -> None:
    clip = load_clip(args)
    real, fake = (folder_features(f, clip, args.batch_size) for f in (args.real, args.images))
    if args.normalised:
        real, fake = unit(real), unit(fake)
    name = "fid_clip_normalised" if args.normalised else "fid_clip"
    print(f"{name} {frechet_distance(real, fake):.4f}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m pbe_lightning.metrics")
    commands = main.add_subparsers(dest="command", required=True)
    imported = commands.add_parser(
        "import-gmm", help="the authors' pickled scikit-learn mixture -> a plain .npz"
    )
    imported.add_argument("pickle", help="e.g. coco2017_gmm_k20 (read without running it)")
    imported.add_argument("--out", required=True, help="where to write the .npz")
    imported.add_argument(
        "--clip", default=PAPER_CLIP, help=f"the CLIP its features come from ({PAPER_CLIP})"
    )
    fit = commands.add_parser("fit-qs", help="fit a QS mixture on a folder of real images")
    fit.add_argument("--real", required=True, help="folder of real images")
    fit.add_argument("--out", required=True, help="where to write the .npz")
    fit.add_argument("--k", type=int, default=20)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--holdout", type=float, default=0.2)
    fit.add_argument("--covariance", choices=("diag", "full"), default="full")
    fit.add_argument(
        "--features", choices=("raw", "normalised"), default="raw",
        help="raw encode_image features (the paper's) or L2-normalised ones",
    )  # fmt: skip
    score = commands.add_parser("qs", help="QS of a folder of images under a mixture")
    score.add_argument("--images", required=True)
    score.add_argument("--model", required=True, help="a .npz from import-gmm or fit-qs")
    score.add_argument("--percentile", action="store_true", help="qs_percentile (ours)")
    fid = commands.add_parser("fid", help="CLIP-feature FID between two folders of images")
    fid.add_argument("--real", required=True, help="the reference set, e.g. test_set_GT")
    fid.add_argument("--images", required=True, help="the images to score, e.g. edits")
    fid.add_argument("--normalised", action="store_true", help="fid_clip_normalised (ours)")
    for sub in (fit, score, fid):
        sub.add_argument("--clip", required=True, help="open_clip arch or local-dir:/folder")
        sub.add_argument("--checkpoint", default=None, help="local weights file for --clip")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sub.add_argument("--batch-size", type=int, default=32)
    return main


COMMANDS = {
    "import-gmm": import_gmm_command,
    "fit-qs": fit_qs_command,
    "qs": qs_command,
    "fid": fid_command,
}


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    COMMANDS[args.command](args)
