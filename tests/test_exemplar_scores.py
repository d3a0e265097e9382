"""Exemplar-following and leakage scores on synthetic edits whose answers are known, and the\n``EditScores`` entries that evaluate.py and training's metrics compute them through."""

import pytest
import torch
import torch.nn.functional as F

from pbe_lightning.metrics.exemplar import (
    ExemplarTruth,
    flat_exemplar,
    leakage,
    score_item,
    summarise,
    swap_moves_toward,
    swapped_truths,
)
from pbe_lightning.metrics.scores import EditScores, KnownEdit

SIZE = 64
HOLE = (16, 12, 52, 50)  # x0, y0, x1, y1
RED, BLUE, GREEN, YELLOW = (0.9, 0.1, 0.1), (0.1, 0.15, 0.9), (0.1, 0.8, 0.2), (0.9, 0.9, 0.1)
EXEMPLAR_BACKGROUND = (0.95, 0.6, 0.85)  # pink
TRUTH = ExemplarTruth(RED, (BLUE, GREEN, YELLOW), EXEMPLAR_BACKGROUND, shape="ellipse")


def gradient_scene() -> torch.Tensor:
    """A grey-green gradient: the source, whose pixels in the hole are the true background."""
    ramp = torch.linspace(0.2, 0.6, SIZE)
    return torch.stack(
        [
            ramp[None, :].expand(SIZE, SIZE),
            torch.full((SIZE, SIZE), 0.45),
            ramp[:, None].expand(SIZE, SIZE),
        ]
    )


def hole_mask() -> torch.Tensor:
    hole = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    x0, y0, x1, y1 = HOLE
    hole[y0:y1, x0:x1] = True
    return hole


def ellipse(box: tuple[int, int, int, int], size: int = SIZE) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1


def rectangle(box: tuple[int, int, int, int], size: int = SIZE) -> torch.Tensor:
    inside = torch.zeros(size, size, dtype=torch.bool)
    x0, y0, x1, y1 = box
    inside[y0:y1, x0:x1] = True
    return inside


def paint(image: torch.Tensor, where: torch.Tensor, colour) -> torch.Tensor:
    out = image.clone()
    out[:, where] = torch.tensor(colour)[:, None]
    return out


SILHOUETTES = {
    "ellipse": ellipse((0, 0, 32, 32), 32).float(),
    "rectangle": rectangle((0, 0, 32, 32), 32).float(),
}
OBJECT = (22, 18, 46, 44)  # inside the hole, with background around it


def test_the_exemplars_colour_painted_into_the_scene_is_followed_without_leakage():
    source = gradient_scene()
    edit = paint(source, ellipse(OBJECT), RED)
    scores = score_item(edit, source, hole_mask(), TRUTH, SILHOUETTES)
    assert scores.colour_followed and scores.shape_followed
    assert scores.painted_shape == "ellipse"
    assert scores.leakage == 0.0
    assert scores.votes[0] == max(scores.votes) and scores.votes[1:] == [0, 0, 0]


@pytest.mark.parametrize("wrong", [BLUE, GREEN, YELLOW])
def test_a_distractors_colour_is_not_followed(wrong):
    source = gradient_scene()
    scores = score_item(paint(source, ellipse(OBJECT), wrong), source, hole_mask(), TRUTH)
    assert not scores.colour_followed
    assert scores.shape_followed is None  # no silhouettes given


def test_a_nearby_shade_of_the_exemplars_colour_is_still_followed():
    source = gradient_scene()
    shade = (0.75, 0.2, 0.15)
    assert score_item(
        paint(source, ellipse(OBJECT), shade), source, hole_mask(), TRUTH
    ).colour_followed


def test_an_untouched_hole_paints_nothing_and_follows_nothing():
    source = gradient_scene()
    scores = score_item(source.clone(), source, hole_mask(), TRUTH, SILHOUETTES)
    assert not scores.colour_followed
    assert scores.painted_fraction == 0.0 and scores.painted_shape is None
    assert scores.leakage == 0.0


def test_the_wrong_shape_in_the_right_colour_follows_the_colour_only():
    source = gradient_scene()
    scores = score_item(
        paint(source, rectangle(OBJECT), RED), source, hole_mask(), TRUTH, SILHOUETTES
    )
    assert scores.colour_followed and not scores.shape_followed
    assert scores.painted_shape == "rectangle"


def pasted_exemplar(source: torch.Tensor) -> torch.Tensor:
    """The exemplar crop (a red ellipse on its pink background, padded) resized into the hole:
    the copy-paste artefact."""
    crop = paint(
        torch.tensor(EXEMPLAR_BACKGROUND)[:, None, None].expand(3, 40, 40).clone(),
        ellipse((8, 8, 32, 32), 40),
        RED,
    )
    x0, y0, x1, y1 = HOLE
    out = source.clone()
    out[:, y0:y1, x0:x1] = F.interpolate(crop[None], (y1 - y0, x1 - x0), mode="nearest")[0]
    return out


def test_a_pasted_exemplar_shows_leakage_and_the_clean_edit_does_not():
    source = gradient_scene()
    pasted = leakage(pasted_exemplar(source), source, hole_mask(), TRUTH)
    clean = leakage(paint(source, ellipse(OBJECT), RED), source, hole_mask(), TRUTH)
    # The crop's padding around the ellipse (1 - pi/4 of its box, plus the pad) is background.
    assert pasted > 0.4 and clean == 0.0


def test_leaked_background_does_not_vote_for_any_candidate():
    source = gradient_scene()
    scores = score_item(pasted_exemplar(source), source, hole_mask(), TRUTH)
    assert scores.colour_followed and scores.votes[1:] == [0, 0, 0]


def test_the_swap_test_needs_each_edit_to_move_toward_its_own_exemplar():
    source, hole = gradient_scene(), hole_mask()
    red, blue = paint(source, ellipse(OBJECT), RED), paint(source, ellipse(OBJECT), BLUE)
    assert swap_moves_toward(red, blue, hole, RED, BLUE)
    assert not swap_moves_toward(blue, red, hole, RED, BLUE)  # each toward the other
    assert not swap_moves_toward(red, red, hole, RED, BLUE)  # the exemplar ignored


def test_edits_of_another_size_than_the_source_are_refused():
    source = gradient_scene()
    with pytest.raises(ValueError, match="resize the edit"):
        score_item(source[:, :32, :32], source, hole_mask(), TRUTH)


def test_summary_states_the_chance_levels():
    source = gradient_scene()
    right = score_item(paint(source, ellipse(OBJECT), RED), source, hole_mask(), TRUTH, SILHOUETTES)
    wrong = score_item(
        paint(source, rectangle(OBJECT), BLUE), source, hole_mask(), TRUTH, SILHOUETTES
    )
    summary = summarise([right, wrong], distractors=3, shapes=len(SILHOUETTES))
    assert summary["colour_following"] == 0.5 and summary["colour_chance"] == 0.25
    assert summary["shape_following"] == 0.5 and summary["shape_chance"] == 0.5


def test_truth_reads_the_toy_benchmarks_manifest_entry():
    entry = {
        "colour": list(RED),
        "shape": "star",
        "exemplar_background": list(EXEMPLAR_BACKGROUND),
        "distractor_colours": [list(BLUE), list(GREEN)],
    }
    truth = ExemplarTruth.from_manifest(entry)
    assert truth.candidates().shape == (3, 3) and truth.shape == "star"


# --- truth read off flat exemplars (training's preview) -------------------------------------
def flat_crop(colour, background, size: int = 40, box=(8, 8, 32, 32)) -> torch.Tensor:
    return paint(
        torch.tensor(background)[:, None, None].expand(3, size, size).clone(),
        ellipse(box, size),
        colour,
    )


def test_a_flat_exemplar_gives_its_object_and_background_colours():
    found = flat_exemplar(flat_crop(RED, EXEMPLAR_BACKGROUND))
    assert found is not None
    assert torch.allclose(torch.tensor(found.colour), torch.tensor(RED))
    assert torch.allclose(torch.tensor(found.background), torch.tensor(EXEMPLAR_BACKGROUND))
    ring = flat_crop(GREEN, BLUE)  # a ring: the background shows through its middle
    ring[:, ellipse((14, 14, 26, 26), 40)] = torch.tensor(BLUE)[:, None]
    assert torch.allclose(torch.tensor(flat_exemplar(ring).colour), torch.tensor(GREEN))
    plain = torch.tensor(BLUE)[:, None, None].expand(3, 40, 40)
    assert flat_exemplar(plain) is None  # nothing differs from its frame: no truth


def test_swapped_truths_paint_the_next_exemplar_with_exchangeable_distractors():
    colours = [RED, BLUE, GREEN, YELLOW, (0.5, 0.1, 0.6)]
    grey = (0.5, 0.5, 0.5)
    references = torch.stack([flat_crop(c, grey) for c in colours])
    plans = swapped_truths(references, distractors=3)
    truth, scene = plans[0]
    assert truth.colour == pytest.approx(BLUE) and scene == pytest.approx(grey)
    assert len(truth.distractor_colours) == 3
    assert all(c != pytest.approx(BLUE) for c in truth.distractor_colours)
    assert plans[-1][0].colour == pytest.approx(RED)  # cyclic
    # An exemplar whose colour is the scene's background cannot be judged: no truth.
    references[1] = flat_crop(grey, (0.1, 0.1, 0.1))
    assert swapped_truths(references, distractors=3)[0] is None
    assert swapped_truths(references[:1]) == [None]  # one sample: nothing to swap with


def test_edit_scores_compute_the_exemplar_scores_only_with_ground_truth(monkeypatch):
    source = gradient_scene()
    right, wrong = paint(source, ellipse(OBJECT), RED), paint(source, rectangle(OBJECT), BLUE)
    known = KnownEdit(TRUTH, source, hole_mask())
    names = ["exemplar_following", "shape_following", "leakage"]
    scores = EditScores(None, metrics=names, ground_truth=True, silhouettes=SILHOUETTES)
    box = (16, 12, 52, 50)
    scores.add_edits(
        [right[None], wrong[None], source[None]],
        [box] * 3,
        [source[None]] * 3,
        [known, known, None],
    )  # the third has no truth: left out
    values = scores.compute()
    assert values == {"exemplar_following": 0.5, "shape_following": 0.5, "leakage": 0.0}
    assert scores.chances() == {"exemplar_following": 0.25, "shape_following": 0.5}
    without = EditScores(None, metrics=names)
    assert set(without.skipped) == set(names) and "ground truth" in without.skipped["leakage"]
    no_shapes = EditScores(None, metrics=names, ground_truth=True)
    assert set(no_shapes.skipped) == {"shape_following"}
    no_shapes.add_edits([right[None]], [box], [source[None]], [None])
    assert no_shapes.compute() == {} and "no edit had" in no_shapes.skipped["leakage"]
