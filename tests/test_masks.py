import pytest
import torch

from pbe_lightning.data.masks import (
    EDIT,
    KEEP,
    MaskGenerator,
    bezier_outline,
    box_masks,
    mask_from_user_image,
    polygon_masks,
)

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
