import pytest
import torch

from pbe_lightning.data import masks as masks_module
from pbe_lightning.data.masks import (
    EDIT,
    KEEP,
    MaskGenerator,
    bezier_outline,
    box_masks,
    mask_from_user_image,
    polygon_masks,
)
from tests.helpers.counters import CountOps

SIZE = 64


def random_boxes(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Object boxes and enlarged boxes containing them, normalised."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=g) * 0.4 + 0.3
    half = torch.rand(n, 2, generator=g) * 0.15 + 0.08
    obj = torch.cat([centre - half, centre + half], dim=1)
    grow = torch.rand(n, 4, generator=g) * 0.1
    enlarged = torch.cat([obj[:, :2] - grow[:, :2], obj[:, 2:] + grow[:, 2:]], dim=1).clamp(0, 1)
    return obj, enlarged


def inside(boxes: torch.Tensor, size: int) -> torch.Tensor:
    return box_masks(boxes, size) == EDIT


def test_box_mask_marks_exactly_the_box_as_edit():
    mask = box_masks(torch.tensor([[0.25, 0.5, 0.75, 1.0]]), 8)
    assert mask.shape == (1, 1, 8, 8)
    expected = torch.full((8, 8), KEEP)
    expected[4:8, 2:6] = EDIT
    assert torch.equal(mask[0, 0], expected)


def test_polygon_fill_of_a_square_matches_the_box_mask():
    square = torch.tensor([[[0.2, 0.2], [0.7, 0.2], [0.7, 0.7], [0.2, 0.7]]])
    assert torch.equal(
        polygon_masks(square, SIZE), box_masks(torch.tensor([[0.2, 0.2, 0.7, 0.7]]), SIZE)
    )


def test_polygon_fill_of_a_triangle_has_half_the_area():
    triangle = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    hole_fraction = (polygon_masks(triangle, 128) == EDIT).float().mean().item()
    assert hole_fraction == pytest.approx(0.5, abs=0.01)


def test_irregular_masks_lie_inside_the_enlarged_box_and_cover_the_object():
    obj, enlarged = random_boxes(64)
    masks = MaskGenerator(irregular_prob=1.0, jitter=0.01)(obj, enlarged, SIZE)
    hole = masks == EDIT
    # Nothing outside the enlarged box...
    assert not (hole & ~inside(enlarged, SIZE)).any()
    # ...and most of every object box (jitter may nibble its border).
    obj_pixels = inside(obj, SIZE)
    coverage = (hole & obj_pixels).flatten(1).sum(1) / obj_pixels.flatten(1).sum(1)
    assert coverage.min() > 0.9
    # And they are not just the rectangle again.
    assert (hole != inside(enlarged, SIZE)).flatten(1).any(1).float().mean() > 0.9


def test_bezier_outline_points_stay_in_the_enlarged_box():
    obj, enlarged = random_boxes(16, seed=3)
    poly = bezier_outline(obj, enlarged, points_per_edge=18, jitter=0.05)
    assert poly.shape == (16, 72, 2)
    assert (poly[..., 0] >= enlarged[:, None, 0] - 1e-6).all()
    assert (poly[..., 1] <= enlarged[:, None, 3] + 1e-6).all()


@pytest.mark.parametrize("prob, expected", [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5)])
def test_irregular_probability_picks_the_shape(prob, expected):
    obj, enlarged = random_boxes(400, seed=1)
    g = torch.Generator().manual_seed(0)
    masks = MaskGenerator(irregular_prob=prob)(obj, enlarged, 32, generator=g)
    is_rect = (masks == box_masks(enlarged, 32)).flatten(1).all(1)
    assert (~is_rect).float().mean().item() == pytest.approx(expected, abs=0.07)


def test_bad_probability_is_rejected_with_the_config_key():
    with pytest.raises(ValueError, match="data.mask.irregular_prob"):
        MaskGenerator(irregular_prob=1.5)


def test_user_mask_files_white_is_edit():
    user = torch.tensor([[[[1.0, 0.0]]]])
    assert mask_from_user_image(user).tolist() == [[[[EDIT, KEEP]]]]


def brute_force_fill(polygons: torch.Tensor, size: int) -> torch.Tensor:
    """Even-odd rule pixel by pixel: count the edges crossing each pixel's row left of it."""
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    start, end = polygons, torch.roll(polygons, shifts=-1, dims=1)
    sx, sy = start[..., 0][:, None, None, :], start[..., 1][:, None, None, :]
    ex, ey = end[..., 0][:, None, None, :], end[..., 1][:, None, None, :]
    py, px = centres[None, :, None, None], centres[None, None, :, None]
    crosses = (sy > py) != (ey > py)
    safe_dy = torch.where(ey == sy, torch.ones_like(ey), ey - sy)
    x_cross = sx + (py - sy) * (ex - sx) / safe_dy
    left = (crosses & (x_cross < px)).sum(-1)
    return torch.where(left % 2 == 1, EDIT, KEEP)[:, None]


@pytest.mark.parametrize("size", [17, 32, 45])
def test_polygon_fill_matches_the_pixel_by_pixel_even_odd_rule(size):
    obj, enlarged = random_boxes(32, seed=5)
    polygons = bezier_outline(obj, enlarged, points_per_edge=6, jitter=0.05)
    # Plus self-intersecting stars and polygons with vertices exactly on pixel centres.
    g = torch.Generator().manual_seed(0)
    stars = torch.rand(8, polygons.shape[1], 2, generator=g)
    on_centres = (torch.randint(0, size, (8, polygons.shape[1], 2), generator=g) + 0.5) / size
    polygons = torch.cat([polygons, stars, on_centres])
    masks = polygon_masks(polygons, size)
    assert masks.dtype == torch.float32
    assert torch.equal(masks, brute_force_fill(polygons, size))


@pytest.fixture
def accelerator_path(monkeypatch):
    monkeypatch.setattr(masks_module, "SUBSET_DEVICES", ())


@pytest.mark.parametrize("prob", [0.0, 0.3, 1.0])
def test_cpu_and_accelerator_paths_draw_the_same_masks(prob, monkeypatch):
    obj, enlarged = random_boxes(64, seed=2)
    generator = MaskGenerator(irregular_prob=prob)
    subsets = generator(obj, enlarged, 48, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(masks_module, "SUBSET_DEVICES", ())
    everything = generator(obj, enlarged, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(subsets, everything)
    assert subsets.shape == (64, 1, 48, 48) and subsets.dtype == torch.float32
    assert torch.equal(subsets.unique(), torch.tensor([EDIT, KEEP]))


def test_same_global_seed_same_masks():
    obj, enlarged = random_boxes(16, seed=4)
    torch.manual_seed(9)
    first = MaskGenerator()(obj, enlarged, 32)
    torch.manual_seed(9)
    assert torch.equal(MaskGenerator()(obj, enlarged, 32), first)


def test_polygons_are_filled_only_for_samples_that_draw_them(monkeypatch):
    filled = []
    real = masks_module.polygon_holes

    def counting(polygons, size):
        filled.append(len(polygons))
        return real(polygons, size)

    monkeypatch.setattr(masks_module, "polygon_holes", counting)
    obj, enlarged = random_boxes(64, seed=2)
    MaskGenerator(irregular_prob=1e-9)(obj, enlarged, 32)
    assert filled == []
    MaskGenerator(irregular_prob=0.5)(obj, enlarged, 32)
    assert len(filled) == 1 and 10 < filled[0] < 54


def test_no_per_sample_loop(accelerator_path):
    # The number of torch ops does not depend on the batch size.
    counts = []
    for batch in (2, 32):
        obj, enlarged = random_boxes(batch, seed=batch)
        with CountOps() as ops:
            MaskGenerator(irregular_prob=0.5)(obj, enlarged, 32)
        counts.append(ops.count)
    assert counts[0] == counts[1]
