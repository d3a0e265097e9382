"""The exemplar encoder's tower families (CLIP, OpenCLIP, SigLIP, DINOv2) and bottlenecks, on
tiny random towers saved in each family's real format and loaded through the real loaders."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch
from safetensors.torch import save_file

from pbe_lightning.checkpoints import check_same_architecture
from pbe_lightning.demo.tiny_encoders import (
    FAMILY,
    TINY_CLIP,
    TINY_DINOV2,
    TINY_SIGLIP,
    ensure_tiny_tower,
    tiny_tower_folder,
)
from pbe_lightning.models.encoder import ExemplarEncoder, build_exemplar_encoder
from pbe_lightning.stops import RunStopped

TINIES = sorted(FAMILY)  # clip, dinov2, openclip, siglip
GRID = 4  # the tiny towers' 4 x 4 patch grid


def encoder(cache_dir, tiny: str, context_dim: int = 24, **options) -> ExemplarEncoder:
    """The tiny ``tiny`` tower, loaded by the production factory from its local-dir: folder."""
    folder = tiny_tower_folder(cache_dir, tiny)
    return build_exemplar_encoder(
        f"local-dir:{folder}", context_dim, family=FAMILY[tiny], **options
    )


@pytest.mark.parametrize("tiny", TINIES)
@pytest.mark.parametrize(
    "options, tokens",
    [
        ({"bottleneck": "cls"}, 1),
        ({"bottleneck": "tokens"}, 1 + GRID * GRID),
        ({"bottleneck": "pooled_k", "pooled_tokens": 4}, 1 + 4),
        ({"bottleneck": "pooled_k", "pooled_tokens": 1}, 1 + 1),
    ],
)
def test_every_family_gives_t_tokens_of_the_unets_width(cache_dir, tiny, options, tokens):
    model = encoder(cache_dir, tiny, **options)
    context = model(torch.rand(3, 3, 64, 64))  # resized to the tower's 32 px inside
    assert context.shape == (3, tokens, 24)
    assert model.context_tokens == tokens
    assert model.unconditional(3, tokens).shape == (3, tokens, 24)


@pytest.mark.parametrize(
    "tiny, width", [("clip", 64), ("openclip", 80), ("siglip", 48), ("dinov2", 96)]
)
def test_the_mapper_is_as_wide_as_the_towers_tokens(cache_dir, tiny, width):
    model = encoder(cache_dir, tiny, bottleneck="tokens")
    assert model.tower_features(torch.rand(2, 3, 32, 32)).shape[-1] == width
    assert model.final_layer_norm.normalized_shape == (width,)
    assert model.proj_out.in_features == width


def library_pooled(tiny: str, folder, pixels: torch.Tensor) -> torch.Tensor:
    """What each family's own library calls the image's pooled embedding, pre-projection."""
    if tiny == "dinov2":
        model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        return model.forward_features(pixels)[:, 0]  # the class token after the final norm
    visual = open_clip.create_model(f"local-dir:{folder}").visual.eval()
    if tiny == "siglip":
        return visual(pixels)  # the MAP head's output: SigLIP's image embedding (no projection)
    visual.proj = None
    return visual(pixels)  # CLIP: the class token after ln_post


@pytest.mark.parametrize("tiny", TINIES)
def test_cls_is_the_towers_own_pooled_embedding(cache_dir, tiny):
    model = encoder(cache_dir, tiny, bottleneck="cls")
    pixels = torch.rand(2, 3, 32, 32)
    expected = library_pooled(
        tiny, tiny_tower_folder(cache_dir, tiny), (pixels - model.mean) / model.std
    )
    assert torch.allclose(model.tower_features(pixels)[:, 0], expected, atol=1e-5)


def test_tokens_and_pooled_k_read_the_patch_tokens_after_the_final_norm(cache_dir):
    pixels = torch.rand(2, 3, 32, 32)
    tokens = encoder(cache_dir, "dinov2", bottleneck="tokens")
    timm_model = timm.create_model(
        f"local-dir:{tiny_tower_folder(cache_dir, 'dinov2')}", pretrained=True
    )
    features = timm_model.eval().forward_features((pixels - tokens.mean) / tokens.std)
    assert torch.allclose(tokens.tower_features(pixels), features, atol=1e-5)  # cls + 16 patches
    pooled = encoder(cache_dir, "dinov2", bottleneck="pooled_k", pooled_tokens=4)
    patches = features[:, 1:].reshape(2, GRID, GRID, -1)
    quadrants = [patches[:, r : r + 2, c : c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)]
    expected = torch.cat([features[:, :1], torch.stack(quadrants, dim=1)], dim=1)
    assert torch.allclose(pooled.tower_features(pixels), expected, atol=1e-5)


@pytest.mark.parametrize("tiny", TINIES)
def test_the_tower_is_frozen_and_stays_in_eval_while_the_mapper_trains(cache_dir, tiny):
    model = encoder(cache_dir, tiny, bottleneck="pooled_k")
    before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    model.train()
    assert not model.vision.training and not any(m.training for m in model.vision.modules())
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1.0)
    model(torch.rand(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in model.vision.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.vision.state_dict().items())
    assert model.mapper.blocks[0].ff.net[2].weight.grad is not None


@pytest.mark.parametrize("arm", TINIES)
def test_a_tower_stored_in_bf16_reads_as_before_in_float32(tiny_cfg, arm):
    # memory=24gb stores the frozen tower in bf16, casting at its boundary (frozen_dtype).
    from pbe_lightning.callbacks.frozen_dtype import cast_frozen
    from pbe_lightning.models.build import build_model

    module = build_model(tiny_cfg(f"model/encoder={arm}", "model/backbone=tiny").model)
    reference = torch.rand(2, 3, 32, 32)
    expected = module.encoder.tower_features(reference)
    cast_frozen(module, "bf16")
    assert {p.dtype for p in module.encoder.vision.parameters()} == {torch.bfloat16}
    got = module.encoder.tower_features(reference)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=0.1, rtol=0.1)


def originals() -> dict:
    """The models the tiny writers save (same seed), built in memory."""
    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP).visual
    torch.manual_seed(0)
    siglip = open_clip.CustomTextCLIP(
        **{k: v for k, v in TINY_SIGLIP.items() if k != "custom_text"}
    )
    torch.manual_seed(0)
    dinov2 = timm.create_model(TINY_DINOV2["architecture"], **TINY_DINOV2["model_args"])
    return {
        "clip": (clip, "open_clip"),
        "siglip": (siglip.visual.trunk, "timm"),
        "dinov2": (dinov2, "timm"),
    }


@pytest.mark.parametrize("tiny", ["clip", "siglip", "dinov2"])
def test_weights_written_in_the_real_format_load_back_equal(tmp_path, tiny):
    original, kind = originals()[tiny]
    original.eval()
    folder = ensure_tiny_tower(tmp_path / tiny, tiny)
    model = build_exemplar_encoder(
        f"local-dir:{folder}", 8, family=FAMILY[tiny], bottleneck="tokens"
    )
    pixels = torch.rand(2, 3, 32, 32)
    normalised = (pixels - model.mean) / model.std
    with torch.no_grad():
        if kind == "open_clip":
            original.proj, original.output_tokens = None, True
            pooled, patches = original(normalised)
            expected = torch.cat([pooled[:, None], patches], dim=1)
        else:
            features = original.forward_features(normalised)
            pooled = original.forward_head(features, pre_logits=True)
            expected = torch.cat(
                [pooled[:, None], features[:, original.num_prefix_tokens :]], dim=1
            )
    assert torch.equal(model.tower_features(pixels), expected)


def test_an_open_clip_name_with_a_local_weights_file_loads_that_file(tmp_path):
    # An open_clip name (here a tiny config registered as one) + model.encoder.checkpoint=FILE.
    (tmp_path / "pbe-test-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "pbe-test-tiny-clip.json")
    torch.manual_seed(1)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    loaded = build_exemplar_encoder("pbe-test-tiny-clip", 8, str(tmp_path / "w.safetensors"))
    assert torch.equal(loaded.vision.conv1.weight, model.visual.conv1.weight)


def test_a_timm_name_with_a_local_weights_file_loads_that_file_at_the_asked_size(tmp_path):
    # As model/encoder=dinov2 reads timm's model.safetensors: name + file, at 224 px where the
    # file was trained at 518 (here 56 -> 28 px: timm resamples the position embedding).
    torch.manual_seed(1)
    weights = tmp_path / "model.safetensors"
    save_file(dict(timm.create_model("vit_small_patch14_dinov2", depth=1).state_dict()), weights)
    with pytest.raises(
        RuntimeError, match="do not fit model.encoder.arch=vit_small_patch14_dinov2"
    ):
        build_exemplar_encoder("vit_small_patch14_dinov2", 8, str(weights), family="dinov2")
    source = timm.create_model("vit_small_patch14_dinov2", img_size=56)
    save_file(dict(source.state_dict()), weights)
    loaded = build_exemplar_encoder(
        "vit_small_patch14_dinov2", 8, str(weights), family="dinov2", image_size=28
    )
    assert loaded.image_size == 28 and loaded.grid == (2, 2) and loaded.context_tokens == 1
    assert loaded.vision.model.pos_embed.shape == (1, 1 + 2 * 2, 384)
    assert torch.equal(
        loaded.vision.model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight
    )


@pytest.mark.parametrize(
    "family, arch, checkpoint, message",
    [
        ("clip", "ViT-L-14", "openai", "model.encoder.checkpoint=openai: no such file"),
        (
            "clip",
            "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            None,
            "hub models are not downloaded",
        ),
        ("siglip", "ViT-SO400M-14-SigLIP", "webli", "model.encoder.checkpoint=webli: no such file"),
        (
            "dinov2",
            "vit_large_patch14_dinov2.lvd142m",
            None,
            "pass model.encoder.checkpoint=/path/to/model.safetensors",
        ),
        ("dinov2", "hf-hub:timm/vit_large_patch14_dinov2.lvd142m", None, "local-dir:/path/to/it"),
    ],
)
def test_hub_tags_and_names_are_refused_before_anything_downloads(
    family, arch, checkpoint, message
):
    with pytest.raises(FileNotFoundError, match=message):
        build_exemplar_encoder(arch, 8, checkpoint, family=family)


def test_missing_files_name_the_path_and_the_fix(cache_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no timm model there \(needs config.json"):
        build_exemplar_encoder(f"local-dir:{tmp_path}", 8, family="dinov2")
    source = tiny_tower_folder(cache_dir, "siglip")
    (tmp_path / "open_clip_config.json").write_text((source / "open_clip_config.json").read_text())
    with pytest.raises(
        FileNotFoundError, match="no weights file .* add its open_clip_model.safetensors"
    ):
        build_exemplar_encoder(f"local-dir:{tmp_path}", 8, family="siglip")
    with pytest.raises(
        FileNotFoundError, match=f"model.encoder.checkpoint={tmp_path}/x.bin: no such"
    ):
        build_exemplar_encoder("ViT-H-14", 8, f"{tmp_path}/x.bin")


def test_a_tower_of_another_family_is_refused_naming_the_setting(cache_dir):
    with pytest.raises(ValueError, match="model.encoder.family=siglip needs an open_clip SigLIP"):
        build_exemplar_encoder(
            f"local-dir:{tiny_tower_folder(cache_dir, 'clip')}", 8, family="siglip"
        )
    with pytest.raises(ValueError, match="model.encoder.family='vit'"):
        build_exemplar_encoder("x", 8, family="vit")


@pytest.mark.parametrize("pooled_tokens", [3, 0, 25])
def test_pooled_tokens_must_be_a_square_within_the_patch_grid(cache_dir, pooled_tokens):
    with pytest.raises(
        ValueError, match=f"model.encoder.pooled_tokens={pooled_tokens}: use a square"
    ):
        encoder(cache_dir, "clip", bottleneck="pooled_k", pooled_tokens=pooled_tokens)


def test_a_resume_across_families_is_refused_even_at_equal_shapes(cache_dir, tmp_path):
    clip = encoder(cache_dir, "clip")  # 64 wide, 4 blocks, 32 px
    tower = timm.create_model(
        "vit_small_patch14_dinov2", patch_size=8, embed_dim=64, depth=4, num_heads=2, img_size=32
    )
    dinov2 = ExemplarEncoder(tower, 64, 24, 32, (0.5,) * 3, (0.5,) * 3, "cls", 1, family="dinov2")
    with pytest.raises(RunStopped, match="model.encoder.family: checkpoint 'clip', now 'dinov2'"):
        check_same_architecture(
            tmp_path / "last.ckpt", clip.architecture(), dinov2.architecture(), False
        )
    pooled = encoder(cache_dir, "clip", bottleneck="pooled_k", pooled_tokens=1)
    other = encoder(cache_dir, "clip", bottleneck="pooled_k", pooled_tokens=4)
    with pytest.raises(RunStopped, match=r"model.encoder \(context tokens\): checkpoint 2, now 5"):
        check_same_architecture(
            tmp_path / "last.ckpt", pooled.architecture(), other.architecture(), False
        )


# -- the config group, the checks and what other parts do with a family ------------------------
PAPER_ARCHS = {
    "clip": "ViT-L-14-quickgelu",
    "openclip": "ViT-H-14",
    "siglip": "ViT-SO400M-14-SigLIP",
    "dinov2": "vit_large_patch14_dinov2.lvd142m",
}


@pytest.mark.parametrize("arm", sorted(PAPER_ARCHS))
def test_each_ablation_arm_is_the_real_tower_on_the_paper_and_a_tiny_one_on_the_demo(tiny_cfg, arm):
    paper = tiny_cfg("experiment=paper", f"model/encoder={arm}").model.encoder
    assert paper._target_ == "pbe_lightning.models.encoder.build_exemplar_encoder"
    assert (paper.arch, paper.family, paper.mapper_depth) == (PAPER_ARCHS[arm], FAMILY[arm], 5)
    demo = tiny_cfg(f"model/encoder={arm}").model.encoder
    assert demo._target_ == "pbe_lightning.demo.tiny_encoders.tiny_exemplar_encoder"
    assert demo.arch.endswith(f"/tiny/encoders/{arm}") and demo.family == FAMILY[arm]


def test_the_paper_sweep_reads_each_familys_own_weights_file(tiny_cfg):
    overrides = [
        "experiment=paper",
        "ablation=encoder",
        "encoder_weights.siglip=/w/siglip.safetensors",
    ]
    assert (
        tiny_cfg(*overrides, "model/encoder=siglip").model.encoder.checkpoint
        == "/w/siglip.safetensors"
    )
    assert tiny_cfg(*overrides, "model/encoder=dinov2").model.encoder.checkpoint is None


@pytest.mark.parametrize(
    "arm, expected",
    [
        (
            "dinov2",
            "model.encoder.checkpoint is not set: pass model.encoder.checkpoint=/path/to/model.safetensors",
        ),
        (
            "siglip",
            "model.encoder.checkpoint is not set: pass model.encoder.checkpoint=/path/to/open_clip_model",
        ),
    ],
)
def test_the_config_checks_name_each_familys_weights_file(tiny_cfg, arm, expected):
    from pbe_lightning.utils.config_checks import config_problems

    problems = config_problems(tiny_cfg("experiment=paper", f"model/encoder={arm}"))
    assert [p for p in problems if p.startswith("model.encoder")] == [
        next(p for p in problems if p.startswith(expected))
    ]
    assert not [p for p in config_problems(tiny_cfg(f"model/encoder={arm}")) if "encoder" in p]


def test_fine_tuning_official_weights_is_clip_only(tiny_cfg, tmp_path):
    from pbe_lightning.models.init_from import InitWeightsMismatch, init_source

    (tmp_path / "model.ckpt").touch()
    cfg = tiny_cfg(
        "experiment=finetune", "model/encoder=siglip", f"model.init_from={tmp_path}/model.ckpt"
    )
    with pytest.raises(InitWeightsMismatch, match="a siglip encoder .* model/encoder=clip_vit_l14"):
        init_source(cfg.model)


def test_export_refuses_other_families_in_one_line_naming_the_checkpoint(tiny_cfg, tmp_path):
    from pbe_lightning.export import export_official, export_pipeline
    from pbe_lightning.models.build import build_model

    module = build_model(tiny_cfg("model/encoder=dinov2", "model/backbone=tiny").model)
    for export, out in [
        (export_pipeline, tmp_path / "pipe"),
        (export_official, tmp_path / "m.ckpt"),
    ]:
        with pytest.raises(
            ValueError, match="family=dinov2 .* keep the Lightning checkpoint"
        ) as info:
            export(module, out)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "pipe").exists() and not (tmp_path / "m.ckpt").exists()


def test_the_openclip_family_exports_to_the_stock_pipeline_like_openais_clip(tiny_cfg, tmp_path):
    # ViT-H/14 is a CLIP ViT too (GELU): transformers' CLIPVisionModel computes it.
    from pbe_lightning.convert.pipeline import load_pipeline
    from pbe_lightning.export import export_pipeline
    from pbe_lightning.models.build import build_model

    module = build_model(tiny_cfg("model/encoder=openclip", "model/backbone=tiny").model).eval()
    with torch.no_grad():
        for param in module.encoder.trainable_parameters():
            param.add_(0.1 * torch.randn_like(param))
    pipe = load_pipeline(export_pipeline(module, tmp_path / "pipe"))
    assert pipe.image_encoder.config.hidden_act == "gelu"
    reference = torch.rand(2, 3, 32, 32)
    pixels = (reference - module.encoder.mean) / module.encoder.std
    with torch.no_grad():
        theirs = pipe.image_encoder(pixels)
        torch.testing.assert_close(theirs, module.encoder(reference), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_encoder_ablation_trains_every_family_on_the_demo(tmp_path, cache_dir):
    # python train.py -m ablation=encoder debug=tiny: four runs, one per family, end to end.
    from pbe_lightning.demo.tiny_models import demo_clip_folder
    from tests.helpers.processes import run_train

    # The demo's metrics CLIP (metrics_clip) is written by model/encoder=demo, which this grid
    # replaces: write it first, as the demo run a user starts with does.
    demo_clip_folder(cache_dir)
    sweep = tmp_path / "sweep"
    result = run_train(
        ["-m", "ablation=encoder", "debug=tiny", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        cache=cache_dir,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    families = []
    for job in range(4):
        checkpoint = torch.load(sweep / str(job) / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] == 4
        families.append(checkpoint["pbe_architecture"]["model.encoder.family"])
        widths = checkpoint["pbe_architecture"]["model.encoder (tower width x layers)"]
        assert checkpoint["state_dict"]["encoder.proj_out.weight"].shape[1] == widths[0]
    assert families == ["clip", "clip", "siglip", "dinov2"]
