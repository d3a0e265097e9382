"""The training step on the real config tree with tiny overrides."""

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict

from pbe_lightning.data.masks import EDIT, KEEP
from pbe_lightning.models.build import build_model
from tests.helpers.training import bare_trainer


@pytest.fixture
def parts(tiny_cfg):
    def make(*overrides):
        cfg = tiny_cfg(*overrides)
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        return cfg, datamodule, build_model(cfg.model)

    return make


def first_batch(datamodule, training=True):
    from pbe_lightning.data.datamodule import device_transform

    batch = next(iter(datamodule.train_dataloader()))
    return device_transform(batch, datamodule.masks, datamodule.augment, training)


def test_batch_contract_and_mask_convention_reach_the_unet(parts):
    cfg, datamodule, model = parts("data.batch_size=3")
    batch = first_batch(datamodule)
    r, s = cfg.data.resolution, cfg.data.reference_size
    assert batch["image"].shape == (3, 3, r, r) and batch["mask"].shape == (3, 1, r, r)
    assert batch["reference"].shape == (3, 3, s, s)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    # KEEP outside, EDIT in the hole, in between on its border (data.mask.edge=soft).
    assert batch["mask"].min() >= EDIT and batch["mask"].max() <= KEEP
    assert torch.equal(batch["masked_image"], batch["image"] * batch["mask"])
    # The hole (EDIT) is where the object is: the object box centre is always inside it.
    centre = ((batch["object_box"][:, :2] + batch["object_box"][:, 2:]) / 2 * r).long()
    assert all(batch["mask"][i, 0, y, x] == EDIT for i, (x, y) in enumerate(centre.tolist()))

    seen = {}

    def capture(module, args, output):
        seen["x"] = args[0]

    model.unet.conv_in.register_forward_hook(capture)
    drop = torch.zeros(3, dtype=torch.bool)
    loss = model.diffusion_loss(batch, drop)
    assert loss.ndim == 0 and torch.isfinite(loss)
    unet_input = seen["x"]
    assert unet_input.shape[1] == 9
    latent_size = unet_input.shape[-2:]
    bilinear = F.interpolate(batch["mask"], size=latent_size, mode="bilinear")  # model.latent_mask
    assert torch.equal(unet_input[:, 8:9], bilinear)


@pytest.mark.parametrize("mode", ["per_sample", "per_batch"])
def test_cfg_dropout_rate(parts, mode):
    *_, model = parts(f"model.cfg_dropout_mode={mode}", "model.cfg_dropout=0.2")
    torch.manual_seed(0)
    draws = torch.stack([model.draw_dropout(8) for _ in range(3000)])  # (calls, batch)
    assert draws.float().mean().item() == pytest.approx(0.2, abs=0.02)
    whole_batch = (draws.all(1) | ~draws.any(1)).float().mean().item()
    if mode == "per_batch":
        assert whole_batch == 1.0
    else:
        assert whole_batch < 0.3  # 0.2^8 + 0.8^8 ~ 0.17 by chance


def test_dropped_samples_get_the_learnable_unconditional_vector(parts):
    *_, model = parts()
    reference = torch.rand(4, 3, 64, 64)
    drop = torch.tensor([True, False, True, False])
    context = model.condition(reference, drop)
    uncond = model.encoder.uncond_vector[0]
    assert torch.equal(context[0], uncond) and torch.equal(context[2], uncond)
    assert not torch.equal(context[1], uncond)


def test_a_few_steps_change_exactly_the_trainable_weights(parts):
    cfg, datamodule, model = parts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {id(p) for p in model.trainable_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    trainer = bare_trainer(max_steps=3)
    trainer.fit(model, datamodule=datamodule)
    after = model.state_dict()
    frozen = [n for n in before if n.startswith(("vae.", "encoder.vision."))]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    optimised = {names[i] for i in trainable}
    assert optimised == {n for n, p in model.named_parameters() if p.requires_grad}
    changed = [n for n in optimised if not torch.equal(before[n], after[n])]
    # Nearly every trainable tensor moves (AdamW touches all with a gradient).
    assert len(changed) >= 0.9 * len(optimised)
    for prefix in (
        "unet.",
        "encoder.mapper.",
        "encoder.proj_out.",
        "encoder.final_layer_norm.",
        "encoder.uncond_vector",
    ):
        assert any(n.startswith(prefix) for n in changed), prefix
    state = trainer.optimizers[0].state_dict()["param_groups"]
    assert sum(len(g["params"]) for g in state) == len(optimised)


def test_validation_samples_are_edits_of_the_right_shape(parts):
    cfg, datamodule, model = parts()
    batch = next(iter(datamodule.val_dataloader()))
    batch = datamodule.on_after_batch_transfer(batch, 0)
    edits = model.paint(batch, steps=2, generator=torch.Generator().manual_seed(0))
    assert edits.shape == batch["image"].shape
    assert edits.min() >= -1 and edits.max() <= 1
    again = model.paint(batch, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(edits, again)


def test_gradient_checkpointing_switch(parts):
    *_, model = parts("model.gradient_checkpointing=true")
    assert model.unet.is_gradient_checkpointing


def test_bad_dropout_values_name_the_config_key(tiny_cfg):
    cfg = tiny_cfg("model.cfg_dropout=1.5")
    with pytest.raises(ValueError, match="model.cfg_dropout"):
        build_model(cfg.model)
    cfg = tiny_cfg()
    with open_dict(cfg):
        cfg.model.cfg_dropout_mode = "sometimes"
    with pytest.raises(ValueError, match="per_sample or per_batch"):
        build_model(cfg.model)
