"""COCOEE metrics on CLIP image features: FID, QS (GIQA-style quality score), region CLIP score.

All use CLIP's standard image embedding (projected, L2-normalised) from an open_clip model with
LOCAL weights. The paper's ViT-B/32 with OpenAI weights is ``arch="ViT-B-32-quickgelu"`` plus
the checkpoint file: plain ``ViT-B-32`` loads it silently with the wrong activation.

QS = mean over images of the percentile of an image's mixture log-likelihood among held-out real
images' log-likelihoods, x 100: real-like sets score ~50, off-distribution ones towards 0. The
scale is ours: do not compare it with the paper's QS numbers.

``EditScores`` is the one scoring path: evaluate.py feeds it a benchmark's edits, the
``EditMetrics`` training callback the validation preview's.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from pbe_lightning.images import PixelBox, centre_square, image_files, read_image, resize
from pbe_lightning.models.encoder import clip_image_size, load_clip_vision

FIT_QS = (
    "python -m pbe_lightning.metrics fit-qs --real DIR --clip ARCH [--checkpoint F] --out qs.npz"
)
INCEPTION_SIZE = 299


class ClipFeatures(nn.Module):
    """``(B, 3, H, W)`` images (float in [0, 1] or uint8) -> unit-norm CLIP image embeddings."""

    def __init__(
        self, visual: nn.Module, image_size: int, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        super().__init__()
        self.visual = visual.requires_grad_(False).eval()
        self.image_size = image_size
        # torchmetrics' FID reads this instead of probing the module with a dummy image.
        self.num_features = int(visual.output_dim)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def load(cls, arch: str, checkpoint: str | None = None) -> ClipFeatures:
        """``arch`` + local ``checkpoint`` file, or ``local-dir:/folder``; hub tags are refused."""
        visual, preprocess = load_clip_vision(arch, checkpoint)
        return cls(visual, clip_image_size(visual), preprocess["mean"], preprocess["std"])

    def train(self, mode: bool = True) -> ClipFeatures:
        super().train(mode)
        self.visual.eval()  # a metric must not depend on dropout or the caller's mode
        return self

    def prepare(self, images: torch.Tensor, mode: str = "crop") -> torch.Tensor:
        """To ``image_size`` square, float in [0, 1]: ``crop`` = CLIP's own preprocessing
        (shorter side to size, centre crop), ``squash`` = both sides to size. Bicubic,
        clamped: it overshoots, PIL-based CLIP preprocessing clips."""
        if images.dtype == torch.uint8:
            images = images.float() / 255
        images = images.to(self.mean.device, torch.float32)
        if mode == "squash":
            return resize(images, (self.image_size, self.image_size))
        return centre_square(images, self.image_size)

    @torch.no_grad()
    def embed(self, resized: torch.Tensor) -> torch.Tensor:
        """Already resized ``(B, 3, S, S)`` images in [0, 1] -> ``(B, D)`` unit vectors."""
        return F.normalize(self.visual((resized - self.mean) / self.std).float(), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.prepare(images))


def folder_features(folder: str | Path, clip: ClipFeatures, batch_size: int = 32) -> torch.Tensor:
    """CLIP features ``(N, D)`` of every image in ``folder``, in sorted file order."""
    files, chunks = image_files(folder), []
    for start in range(0, len(files), batch_size):
        # Resized one by one: images in a folder rarely share one size.
        batch = [clip.prepare(read_image(f)) for f in files[start : start + batch_size]]
        chunks.append(clip.embed(torch.cat(batch)).cpu())
    return torch.cat(chunks)


# --- FID -----------------------------------------------------------------------------------


def clip_fid(
    real_features: torch.Tensor | np.ndarray, fake_features: torch.Tensor | np.ndarray
) -> float:
    """Frechet distance between Gaussians fitted to two ``(N, D)`` feature sets:
    ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``, unbiased covariances like torchmetrics."""
    real, fake = (torch.as_tensor(f).double().cpu() for f in (real_features, fake_features))
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = torch.cov(real.T).reshape(len(mu1), -1), torch.cov(fake.T).reshape(len(mu2), -1)
    # tr (S1 S2)^1/2 = tr (S1^1/2 S2 S1^1/2)^1/2: a symmetric PSD matrix, so eigh is stable
    # where eigvals of the non-symmetric product can return spurious complex parts.
    values, vectors = torch.linalg.eigh(s1)
    root1 = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    middle = root1 @ s2 @ root1
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * trace_root)


def clip_fid_metric(clip: ClipFeatures, **kwargs: object) -> nn.Module:
    """torchmetrics' FID with CLIP features; ``update(images, real=...)`` takes float [0, 1]."""
    # normalize=True: images reach ``clip`` as floats in [0, 1], untouched.
    return FrechetInceptionDistance(feature=clip, normalize=True, **kwargs)


# --- QS: a Gaussian mixture fitted by EM -----------------------------------------------------


@dataclass
class GaussianMixture:
    """Mixture parameters plus the held-out real log-likelihoods QS is measured against.

    ``covariances`` is ``(K, D)`` (diagonal) or ``(K, D, D)`` (full)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    reference: np.ndarray  # sorted log-likelihoods of held-out real images
    history: np.ndarray  # mean log-likelihood of the fit set after each EM step
    clip: str = ""

    def log_likelihood(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        x = _float64(features)
        params = (self.weights, self.means, self.covariances)
        joint = _component_log_prob(x, *(torch.from_numpy(a) for a in params))
        return torch.logsumexp(joint, dim=1).numpy()


def _float64(features: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    if isinstance(features, torch.Tensor):
        return features.detach().cpu().double()
    return torch.from_numpy(np.array(features, dtype=np.float64))


def _component_log_prob(
    x: torch.Tensor, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor
) -> torch.Tensor:
    """``log w_k + log N(x_n | mu_k, S_k)`` as ``(N, K)``; one component at a time to bound memory."""
    columns = []
    for mean, cov in zip(means, covs):
        diff = x - mean
        if cov.dim() == 1:
            maha, logdet = (diff.square() / cov).sum(1), cov.log().sum()
        else:
            chol = torch.linalg.cholesky(cov)
            maha = torch.linalg.solve_triangular(chol, diff.T, upper=False).square().sum(0)
            logdet = 2 * chol.diagonal().log().sum()
        columns.append(-0.5 * (x.shape[1] * math.log(2 * math.pi) + logdet + maha))
    return torch.stack(columns, 1) + weights.clamp(min=1e-300).log()


def _kmeans_init(
    x: torch.Tensor, k: int, generator: torch.Generator, steps: int = 10
) -> torch.Tensor:
    """k-means++ seeding and a few Lloyd steps: EM from random points often merges clusters."""
    centres = x[torch.randint(len(x), (1,), generator=generator)]
    for _ in range(k - 1):
        distance = torch.cdist(x, centres).min(1).values.square()
        pick = torch.multinomial(distance + 1e-12, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
    for _ in range(steps):
        labels = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            if (labels == j).any():  # an empty cluster keeps its seed point
                centres[j] = x[labels == j].mean(0)
    return F.one_hot(torch.cdist(x, centres).argmin(1), k).double()


def _m_step(
    x: torch.Tensor, resp: torch.Tensor, covariance: str, reg: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = resp.sum(0) + 1e-10
    means = resp.T @ x / counts[:, None]
    covs = []
    for j in range(len(means)):
        weighted = resp[:, j, None] * (x - means[j])
        if covariance == "diag":
            covs.append((weighted * (x - means[j])).sum(0) / counts[j] + reg)
        else:
            covs.append(weighted.T @ (x - means[j]) / counts[j] + reg * torch.eye(x.shape[1]))
    return counts / len(x), means, torch.stack(covs)


def fit_gmm(
    features: torch.Tensor | np.ndarray,
    k: int = 20,
    seed: int = 0,
    covariance: str = "full",
    reg_covar: float = 0.1,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> GaussianMixture:
    """EM for a ``k``-component mixture; ``reference`` is left empty (see fit_quality_model).

    Full covariances: CLIP features are strongly correlated and off-distribution images show
    in those correlations (tiny model: noise scored QS ~7 full, 20-38 diagonal). A component
    owns fewer points than dimensions (k=20, a few thousand 512-d features), so its covariance
    is singular: ``reg_covar`` x the mean per-dimension variance is added to the diagonal
    (scale-free shrinkage; at 1e-3 EM froze on its k-means start there, at 0.1 it did not).
    As with scikit-learn's ``reg_covar``, that M step is inexact: the likelihood can dip a bit.
    """
    if covariance not in ("diag", "full"):
        raise ValueError(f"covariance={covariance!r}: use 'diag' or 'full'")
    x = _float64(features)
    if len(x) < k:
        raise ValueError(f"{len(x)} samples cannot fit a {k}-component mixture")
    reg = reg_covar * float(x.var(0).mean())
    params = _m_step(x, _kmeans_init(x, k, torch.Generator().manual_seed(seed)), covariance, reg)
    history: list[float] = []
    for _ in range(max_iter):
        joint = _component_log_prob(x, *params)
        total = torch.logsumexp(joint, dim=1, keepdim=True)
        history.append(float(total.mean()))
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol * abs(history[-2]) + 1e-12:
            break
        params = _m_step(x, (joint - total).exp(), covariance, reg)
    arrays = [p.numpy() for p in params]
    return GaussianMixture(*arrays, reference=np.zeros(0), history=np.array(history))


def fit_quality_model(
    features: torch.Tensor | np.ndarray,
    k: int = 20,
    seed: int = 0,
    holdout: float = 0.2,
    **gmm_options: object,
) -> GaussianMixture:
    """Fit on a random ``1 - holdout`` of the real features; keep the held-out log-likelihoods.

    Held out because the fit set's own likelihoods are optimistic (EM fitted them): real
    images the mixture has not seen are the fair yardstick for generated ones.
    """
    x = _float64(features).numpy()
    order = np.random.default_rng(seed).permutation(len(x))
    held = holdout_size(len(x), holdout)
    # holdout=0 falls back to the fit set itself (optimistic, but usable on tiny sets).
    fit_rows, held_rows = order[held:], order[:held] if held else order
    model = fit_gmm(x[fit_rows], k, seed, **gmm_options)  # type: ignore[arg-type]
    model.reference = np.sort(model.log_likelihood(x[held_rows]))
    return model


def holdout_size(count: int, holdout: float) -> int:
    """How many of ``count`` real features ``fit_quality_model`` holds out (the rest fit)."""
    return int(round(holdout * count))


def quality_score(features: torch.Tensor | np.ndarray, model: GaussianMixture) -> float:
    """Mean percentile (mid-rank, 0-100) of each image's log-likelihood among the reference's."""
    scores = model.log_likelihood(features)
    below = np.searchsorted(model.reference, scores, side="left")
    not_above = np.searchsorted(model.reference, scores, side="right")
    return float(np.mean((below + not_above) / 2 / len(model.reference)) * 100)


def save_quality_model(model: GaussianMixture, path: str | Path) -> None:
    arrays = {name: getattr(model, name) for name in ("weights", "means", "covariances")}
    meta = json.dumps({"clip": model.clip, "version": 1})
    np.savez(path, **arrays, reference=model.reference, history=model.history, meta=meta)


def load_quality_model(path: str | Path) -> GaussianMixture:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        names = ("weights", "means", "covariances", "reference", "history")
        return GaussianMixture(*(data[n] for n in names), clip=meta["clip"])


def load_quality_model_for(
    path: str | Path, clip_arch: str, option: str = "qs_model"
) -> GaussianMixture:
    """The mixture in ``path``, refused unless it was fitted on ``clip_arch``'s features (other
    features would make the score meaningless); ``option`` names the setting in errors."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{option}={path}: no such file; fit one with `{FIT_QS}`")
    model = load_quality_model(path)
    if model.clip and model.clip != clip_arch:
        raise ValueError(f"{option} {path} was fitted with --clip {model.clip}, not {clip_arch}")
    return model


# --- region CLIP score ---------------------------------------------------------------------


def region_clip_score(
    generated: torch.Tensor | Sequence[torch.Tensor],
    mask_boxes: Sequence[PixelBox],
    references: torch.Tensor | Sequence[torch.Tensor],
    clip: ClipFeatures,
) -> float:
    """Mean 100 x cosine(CLIP(generated cropped to its box), CLIP(reference)).

    Both sides are squashed to CLIP's input size, as Paint by Example feeds its reference,
    so a region identical to its reference scores 100 whatever its aspect ratio.
    """
    regions, refs = [], []
    for image, (x0, y0, x1, y1), ref in zip(generated, mask_boxes, references, strict=True):
        regions.append(clip.prepare(image[None, :, y0:y1, x0:x1], "squash"))
        refs.append(clip.prepare(ref[None], "squash"))
    similarity = (clip.embed(torch.cat(regions)) * clip.embed(torch.cat(refs))).sum(1)
    return float(similarity.mean() * 100)


# --- all of them over a set of edits ---------------------------------------------------------


class EditScores:
    """CLIP-FID against real images, region CLIP score and (with a mixture) QS of a set of
    edits, fed in batches of any-size ``(1, 3, H, W)`` images in [0, 1]; ``compute()`` -> the
    metric dict. ``inception``: an optional second FID (Inception features, 299 px squares);
    ``fid=False``: no FID at all (it needs at least two images on each side).

    Local to one process: CLIP-FID is not synchronised across ranks (``sync_on_compute=False``),
    so one rank can score alone while the others do something else (build ``inception`` with
    ``sync_on_compute=False`` too for that).
    """

    def __init__(
        self,
        clip: ClipFeatures,
        qs_model: GaussianMixture | None = None,
        inception: nn.Module | None = None,
        fid: bool = True,
    ) -> None:
        device = clip.mean.device
        self.clip, self.qs_model = clip, qs_model
        self.fids = {}
        if fid:
            self.fids["fid_clip"] = clip_fid_metric(clip, sync_on_compute=False).to(device)
        if inception is not None and fid:
            self.fids["fid_inception"] = inception.to(device)
        self.features: list[torch.Tensor] = []  # CLIP features of the edits, for QS
        self.clip_scores: list[float] = []  # one per edit, in the order given
        self.real_count = self.edit_count = 0

    def _update_fids(self, images: Sequence[torch.Tensor], real: bool) -> torch.Tensor:
        """Feed one batch to every FID; returns CLIP's input (for QS)."""
        clip_input = torch.cat([self.clip.prepare(image) for image in images])
        if "fid_clip" in self.fids:
            self.fids["fid_clip"].update(clip_input, real=real)
        if "fid_inception" in self.fids:
            square = torch.cat([centre_square(image, INCEPTION_SIZE) for image in images])
            self.fids["fid_inception"].update(square.to(clip_input.device), real=real)
        return clip_input

    @torch.no_grad()
    def add_real(self, images: Sequence[torch.Tensor]) -> None:
        if self.fids:  # only FID looks at real images
            self._update_fids(images, real=True)
        self.real_count += len(images)

    @torch.no_grad()
    def add_edits(
        self,
        edits: Sequence[torch.Tensor],
        mask_boxes: Sequence[PixelBox],
        references: Sequence[torch.Tensor],
    ) -> list[float]:
        """Edits with their mask boxes (pixels of the edit) and references; returns each edit's
        region CLIP score."""
        clip_input = self._update_fids(edits, real=False)
        if self.qs_model is not None:
            self.features.append(self.clip.embed(clip_input).cpu())
        scores = [
            region_clip_score([edit[0]], [box], [reference[0]], self.clip)
            for edit, box, reference in zip(edits, mask_boxes, references, strict=True)
        ]
        self.clip_scores.extend(scores)
        self.edit_count += len(edits)
        return scores

    def compute(self) -> dict[str, float]:
        """``fid_clip`` (and ``fid_inception``) unless ``fid=False``, ``qs`` with a mixture,
        ``clip_score``."""
        if not self.edit_count:
            raise ValueError("no edits to score")
        values = {name: float(metric.compute()) for name, metric in self.fids.items()}
        if self.qs_model is not None:
            values["qs"] = quality_score(torch.cat(self.features), self.qs_model)
        values["clip_score"] = sum(self.clip_scores) / len(self.clip_scores)
        return values


# --- command line --------------------------------------------------------------------------


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
    clip = ClipFeatures.load(args.clip, args.checkpoint).to(args.device)
    features = folder_features(args.real, clip, args.batch_size)
    model = fit_quality_model(features, args.k, args.seed, args.holdout, covariance=args.covariance)
    model.clip = args.clip
    save_quality_model(model, args.out)
    print(f"fitted k={args.k} on {len(features)} images ({model.reference.size} held out)")


def qs_command(args: argparse.Namespace) -> None:
    model = load_quality_model(args.model)
    if model.clip and model.clip != args.clip:  # other features: the score would be meaningless
        raise SystemExit(f"{args.model} was fitted with --clip {model.clip}, not {args.clip}")
    clip = ClipFeatures.load(args.clip, args.checkpoint).to(args.device)
    print(f"QS {quality_score(folder_features(args.images, clip), model):.2f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pbe_lightning.metrics")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit-qs", help="fit the QS mixture on a folder of real images")
    fit.add_argument("--real", required=True, help="folder of real images")
    fit.add_argument("--out", required=True, help="where to write the .npz")
    fit.add_argument("--k", type=int, default=20)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--holdout", type=float, default=0.2)
    fit.add_argument("--covariance", choices=("diag", "full"), default="full")
    fit.add_argument("--batch-size", type=int, default=32)
    score = commands.add_parser("qs", help="QS of a folder of images under a fitted mixture")
    score.add_argument("--images", required=True)
    score.add_argument("--model", required=True, help="the .npz written by fit-qs")
    for sub in (fit, score):
        sub.add_argument("--clip", required=True, help="open_clip arch or local-dir:/folder")
        sub.add_argument("--checkpoint", default=None, help="local weights file for --clip")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    {"fit-qs": fit_qs_command, "qs": qs_command}[args.command](args)


if __name__ == "__main__":
    main()
