import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pbe_lightning.data.augment import Augment
from tests.conftest import CONF


def load_augment(name: str) -> Augment:
    cfg = OmegaConf.load(CONF / "data" / "augment" / f"{name}.yaml")
    if "defaults" in cfg:  # the variants override paper.yaml
        base = OmegaConf.load(CONF / "data" / "augment" / "paper.yaml")
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults"})
    return instantiate(cfg)


def test_every_preset_keeps_reference_shape_and_range():
    torch.manual_seed(0)
    reference = torch.rand(4, 3, 64, 64)
    for name in ("paper", "none", "strong"):
        out = load_augment(name).reference(reference)
        assert out.shape == reference.shape
        assert out.min() >= 0 and out.max() <= 1


def test_none_is_the_identity_and_paper_changes_something():
    reference = torch.rand(8, 3, 64, 64)
    assert torch.equal(load_augment("none").reference(reference), reference)
    torch.manual_seed(0)
    assert not torch.equal(load_augment("paper").reference(reference), reference)


def test_scene_flip_keeps_the_mask_aligned_with_the_image():
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
    flipped = (mask_out != mask).flatten(1).any(1)
    assert 0 < flipped.sum() < 16
