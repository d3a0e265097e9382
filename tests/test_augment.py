import math

import kornia
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pbe_lightning.data import augment as augment_module
from pbe_lightning.data.augment import Augment, homography_grid, rotation_matrices, sample
from tests.helpers.config import CONF
from tests.helpers.counters import CountOps

PRESETS = ("paper", "none", "strong")
ONLY = dict(hflip=0, rotation=0, blur=0, elastic=0, color_jitter=0, perspective=0)


def load_augment(name: str) -> Augment:
    cfg = OmegaConf.load(CONF / "data" / "augment" / f"{name}.yaml")
    if "defaults" in cfg:  # the variants override paper.yaml
        base = OmegaConf.load(CONF / "data" / "augment" / "paper.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    return instantiate(cfg)


@pytest.fixture(params=["cpu-subsets", "accelerator-path"])
def path(request, monkeypatch):
    """Both code paths on the CPU: ops on the drawn samples only, or on all and torch.where."""
    if request.param == "accelerator-path":
        monkeypatch.setattr(augment_module, "SUBSET_DEVICES", ())
    return request.param


def same_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a == b).flatten(1).all(1)


def centres(height: int, width: int) -> torch.Tensor:
    identity = torch.eye(2, 3)[None]
    grid = F.affine_grid(identity, [1, 1, height, width], align_corners=False)
    return torch.cat([grid.reshape(-1, 2), torch.ones(height * width, 1)], 1).T


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_keeps_reference_shape_and_range(name, path):
    torch.manual_seed(0)
    reference = torch.rand(16, 3, 64, 64)
    before = reference.clone()
    out = load_augment(name).reference(reference)
    assert out.shape == reference.shape and out.dtype == reference.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(reference, before)  # the input is never written


def test_none_is_the_identity_and_paper_changes_something(path):
    reference = torch.rand(8, 3, 64, 64)
    assert torch.equal(load_augment("none").reference(reference), reference)
    torch.manual_seed(0)
    assert not torch.equal(load_augment("paper").reference(reference), reference)


@pytest.mark.parametrize("name", ["paper", "every op at 0.3"])
def test_samples_that_draw_no_op_come_out_bit_identical(name, path):
    # The unchanged samples must be exactly the input (not resampled on an identity grid),
    # and as many as the probabilities say.
    if name == "paper":
        augment = load_augment(name)
    else:
        augment = Augment(**{op: 0.3 for op in augment_module.REFERENCE_OPS})
    untouched = math.prod(1 - augment.p[op] for op in augment_module.REFERENCE_OPS)
    torch.manual_seed(1)
    reference = torch.rand(400, 3, 16, 16)
    out = augment.reference(reference)
    unchanged = same_per_sample(out, reference).float().mean().item()
    assert unchanged == pytest.approx(untouched, abs=0.06)
    assert unchanged > 0


def test_flip_alone_is_an_exact_mirror(path):
    torch.manual_seed(0)
    reference = torch.rand(64, 3, 32, 32)
    out = Augment(**{**ONLY, "hflip": 0.5}).reference(reference)
    flipped = same_per_sample(out, reference.flip(-1))
    kept = same_per_sample(out, reference)
    assert (flipped | kept).all()
    assert 0.3 < flipped.float().mean() < 0.7


def test_flip_with_a_warp_mirrors_the_warped_image():
    # Flip and rotation in one homography: the flipped samples are the mirror image of the
    # unflipped ones (same angle): flip(rotate(x)) == rotate(-angle) of flip(x).
    torch.manual_seed(0)
    x = torch.rand(1, 3, 31, 31)
    angle = torch.tensor([25.0])
    grid = centres(31, 31)
    rotate = rotation_matrices(angle, 31, 31)
    mirror = torch.diag(torch.tensor([-1.0, 1.0, 1.0]))
    flipped_then_rotated = sample(x, homography_grid(mirror @ rotate, grid, 31, 31, False))
    expected = sample(x.flip(-1), homography_grid(rotate, grid, 31, 31, False))
    torch.testing.assert_close(flipped_then_rotated, expected, atol=1e-5, rtol=0)


def test_rotation_by_a_known_angle_moves_a_marked_pixel_where_expected():
    # Counter-clockwise on screen (Kornia's sense): 90 degrees takes the pixel right of the
    # centre to the one above it.
    size = 33  # odd: the centre is a pixel
    image = torch.zeros(1, 1, size, size)
    centre = size // 2
    image[0, 0, centre, centre + 10] = 1
    grid = homography_grid(
        rotation_matrices(torch.tensor([90.0]), size, size), centres(size, size), size, size, False
    )
    out = sample(image, grid)[0, 0]
    row, col = divmod(int(out.argmax()), size)
    assert (row, col) == (centre - 10, centre)
    assert out.max() > 0.99


def test_rotation_matches_kornias_rotate_on_a_non_square_image():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 40, 56)
    angles = torch.tensor([30.0, -45.0, 90.0])
    grid = homography_grid(rotation_matrices(angles, 40, 56), centres(40, 56), 40, 56, False)
    ours = sample(x, grid)
    theirs = kornia.geometry.transform.rotate(x, angles, padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def _stream(n: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """The draws ``reference`` makes, in its documented order, after ``torch.manual_seed``:
    one per sample and op, then each active op's parameters (elastic noise last)."""
    torch.rand(n, len(augment_module.REFERENCE_OPS))
    return [torch.rand(shape) for shape in shapes]


def test_reference_rotation_draws_uniform_angles_like_kornia():
    torch.manual_seed(3)
    x = torch.rand(6, 3, 48, 48)
    augment = Augment(**{**ONLY, "rotation": 1.0, "rotation_degrees": 30})
    torch.manual_seed(7)
    out = augment.reference(x)
    torch.manual_seed(7)
    (uniform,) = _stream(6, (6,))
    angles = (uniform * 2 - 1) * 30
    theirs = kornia.geometry.transform.rotate(x, angles, padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(out, theirs.clamp(0, 1), atol=1e-4, rtol=0)


def test_reference_elastic_is_kornias_elastic_transform():
    torch.manual_seed(3)
    x = torch.rand(4, 3, 48, 48)
    augment = Augment(
        **{**ONLY, "elastic": 1.0, "elastic_kernel": 15, "elastic_sigma": 4.0, "elastic_alpha": 2.0}
    )
    torch.manual_seed(7)
    out = augment.reference(x)
    assert not torch.equal(out, x)
    torch.manual_seed(7)
    (noise,) = _stream(4, (4, 2, 48, 48))
    theirs = kornia.geometry.transform.elastic_transform2d(
        x, noise * 2 - 1, (15, 15), (4.0, 4.0), (2.0, 2.0)
    )
    torch.testing.assert_close(out, theirs.clamp(0, 1), atol=1e-5, rtol=0)


def test_blur_and_jitter_match_kornia():
    torch.manual_seed(0)
    x = torch.rand(5, 3, 40, 40)
    sigma = torch.rand(5) * 2 + 0.1
    ours = augment_module.gaussian_blur(x, sigma, 7)
    theirs = kornia.filters.gaussian_blur2d(x, (7, 7), sigma[:, None].expand(-1, 2))
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)

    factors = torch.cat([torch.rand(5, 3) * 0.4 + 0.8, torch.rand(5, 1) * 0.1 - 0.05], 1)
    jitter = kornia.augmentation.ColorJitter(0.2, 0.2, 0.2, 0.05, p=1.0, order=(0, 1, 2, 3))
    params = jitter.forward_parameters(x.shape)
    for i, key in enumerate(("brightness", "contrast", "saturation", "hue")):
        params[f"{key}_factor"] = factors[:, i]
    ours = augment_module.color_jitter(x, factors)
    torch.testing.assert_close(ours, jitter(x, params=params), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["paper", "strong"])
def test_one_grid_sample_per_reference_call(name, path, monkeypatch):
    calls = []
    real = F.grid_sample

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", counting)
    torch.manual_seed(0)
    load_augment(name).reference(torch.rand(16, 3, 32, 32))
    assert len(calls) == 1


def test_same_seed_same_output_and_generator_argument(path):
    augment = load_augment("strong")
    reference = torch.rand(16, 3, 32, 32)
    torch.manual_seed(5)
    first = augment.reference(reference)
    torch.manual_seed(5)
    second = augment.reference(reference)
    assert torch.equal(first, second)
    torch.manual_seed(6)
    assert not torch.equal(augment.reference(reference), first)
    with_generator = augment.reference(reference, generator=torch.Generator().manual_seed(5))
    assert torch.equal(with_generator, first)  # same stream as the global generator


@pytest.mark.parametrize("elastic", [0.0, 1.0])
def test_cpu_and_accelerator_paths_agree(elastic, monkeypatch):
    # Elastic noise is drawn for the drawn samples on the CPU and for all on an accelerator,
    # so the streams only coincide when every sample or none draws it.
    augment = Augment(
        hflip=0.5, rotation=0.5, perspective=0.5, color_jitter=0.5, blur=0.5, elastic=elastic
    )
    reference = torch.rand(16, 3, 32, 32)
    torch.manual_seed(2)
    subsets = augment.reference(reference)
    monkeypatch.setattr(augment_module, "SUBSET_DEVICES", ())
    torch.manual_seed(2)
    everything = augment.reference(reference)
    torch.testing.assert_close(subsets, everything, atol=1e-6, rtol=0)


def test_no_per_sample_loop(monkeypatch):
    # On the accelerator path the number of torch ops does not depend on the batch size.
    monkeypatch.setattr(augment_module, "SUBSET_DEVICES", ())
    augment = load_augment("strong")
    augment.reference(torch.rand(1, 3, 32, 32))  # builds the cached grid and kernels
    counts = []
    for batch in (2, 16):
        with CountOps() as ops:
            augment.reference(torch.rand(batch, 3, 32, 32))
            augment.scene(torch.rand(batch, 3, 32, 32), torch.ones(batch, 1, 32, 32))
        counts.append(ops.count)
    assert counts[0] == counts[1]


def test_bad_probability_names_the_config_key():
    with pytest.raises(ValueError, match="data.augment.rotation"):
        Augment(rotation=1.5)
    with pytest.raises(ValueError, match="data.augment.blur_kernel"):
        Augment(blur_kernel=6)


def test_scene_flip_keeps_the_mask_aligned_with_the_image(path):
    # The hole's pixels are painted white in the image; after a joint flip the white pixels
    # must still be exactly where the mask says EDIT, and both flipped for some samples.
    torch.manual_seed(0)
    mask = torch.ones(16, 1, 32, 32)
    mask[:, :, 8:20, 2:10] = 0
    image = torch.where(mask == 0, torch.ones(16, 3, 32, 32), -torch.ones(16, 3, 32, 32))
    image_out, mask_out = Augment(scene_hflip=0.5, hflip=0, rotation=0, blur=0, elastic=0).scene(
        image, mask
    )
    assert image_out.shape == image.shape and mask_out.shape == mask.shape
    assert torch.equal((image_out[:, :1] > 0), (mask_out == 0))
    assert torch.equal(mask_out.unique(), torch.tensor([0.0, 1.0]))  # still exactly binary
    flipped = (mask_out != mask).flatten(1).any(1)
    assert 0 < flipped.sum() < 16
    assert torch.equal(mask_out[flipped], mask[flipped].flip(-1))
