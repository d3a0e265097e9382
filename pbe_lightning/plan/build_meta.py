"""The real-size PaintByExampleModule from architecture configs alone, on fake tensors.

No weight file is read: the UNet and VAE come from their diffusers configs (the backbone
folder's ``unet/`` and ``vae/config.json`` when it exists, else ``model.backbone.config`` or
the packaged SD 1.x configs), the exemplar encoder's tower from its library's model config,
all built under torch's ``FakeTensorMode`` (shapes and dtypes, no storage). The module is then assembled as
``models/build.py`` assembles it, with the same options. The encoder comes from its own
factory: one that takes ``load_weights`` (every tower family of ``build_exemplar_encoder``)
builds from configs with ``load_weights=False``; other factories (the demo's tiny models) are
called as training calls them and their tensors replaced by fake ones. Without a fake mode the
same code builds the real module with random weights (what ``bench/memory_plan.py`` measures
on a device).
"""

from __future__ import annotations

import inspect
import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
from diffusers import AutoencoderKL, UNet2DConditionModel
from hydra.utils import get_object
from omegaconf import DictConfig
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from pbe_lightning.models.backbone import SD15_CONFIG, Backbone, widen_input
from pbe_lightning.models.build import PARTS
from pbe_lightning.models.encoder import ExemplarEncoder
from pbe_lightning.models.module import PaintByExampleModule
from pbe_lightning.utils.instantiators import instantiate

LOAD_BACKBONE = "pbe_lightning.models.backbone.load_backbone"


@dataclass
class BuiltModel:
    module: PaintByExampleModule
    sources: list[str] = field(default_factory=list)  # where each architecture came from


def fake_mode() -> FakeTensorMode:
    # Non-fake inputs allowed: schedulers and optimisers keep small real tables (betas, qmaps).
    return FakeTensorMode(allow_non_fake_inputs=True)


def build_module(model: DictConfig, mode: FakeTensorMode | None) -> BuiltModel:
    """``model`` is the ``model`` config node (as ``build_model`` takes it); ``mode`` None
    builds real tensors (random weights)."""
    sources: list[str] = []
    backbone = backbone_from_config(model.backbone, mode, sources)
    context_dim = backbone.unet.config.cross_attention_dim
    encoder = encoder_from_config(model.encoder, context_dim, mode, sources)
    options = {k: v for k, v in model.items() if k not in (*PARTS, "init_from")}
    options["compile_unet"] = False  # compiled or not, the same tensors are kept
    with within(mode):
        module = PaintByExampleModule(
            backbone=backbone,
            encoder=encoder,
            noise_scheduler=instantiate(model.noise_scheduler),
            optimizer=instantiate(model.optimizer),
            lr_scheduler=None,
            model_config=None,
            **options,
        )
    return BuiltModel(module, sources)


def within(mode: FakeTensorMode | None) -> AbstractContextManager:
    return mode if mode is not None else nullcontext()


def backbone_from_config(
    node: DictConfig, mode: FakeTensorMode | None, sources: list[str]
) -> Backbone:
    if node.get("_target_") != LOAD_BACKBONE:
        sources.append(f"backbone: {node.get('_target_')} (called, then its tensors faked)")
        return faked(instantiate(node), mode)
    unet_config, vae_config, source = backbone_configs(node.get("path"), node.get("config"))
    sources.append(f"backbone: {source}")
    with within(mode):
        unet = UNet2DConditionModel.from_config(unet_config)
        vae = AutoencoderKL.from_config(vae_config).requires_grad_(False).eval()
        return Backbone(vae=vae, unet=widen_input(unet))


def backbone_configs(path: str | None, config: str | None) -> tuple[dict, dict, str]:
    """UNet and VAE configs: the diffusers folder's own, else the architecture folder."""
    folder = Path(path).expanduser() if path else None
    if folder is not None and (folder / "unet" / "config.json").is_file():
        return _read(folder / "unet"), _read(folder / "vae"), f"configs of {folder}"
    arch = Path(config) if config else SD15_CONFIG
    if not (arch / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"no architecture config at {arch}: pass model.backbone.config=<folder with unet/ "
            "and vae/config.json>"
        )
    why = "a single file" if folder is not None and folder.is_file() else "no weights needed"
    name = "the packaged SD 1.x configs" if arch == SD15_CONFIG else f"configs of {arch}"
    return _read(arch / "unet"), _read(arch / "vae"), f"{name} ({why})"


def _read(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def encoder_from_config(
    node: DictConfig, context_dim: int, mode: FakeTensorMode | None, sources: list[str]
) -> ExemplarEncoder:
    """The exemplar encoder of ``model.encoder`` (``node``), built by its own factory.

    A factory that takes ``load_weights`` (``build_exemplar_encoder``: every tower family)
    builds its architecture from configs alone with ``load_weights=False``, here inside the
    fake mode. Other factories (the demo's tiny ones, which need no weight file) are called as
    training calls them, and their tensors faked. A new encoder family needs nothing here.
    """
    target = node.get("_target_")
    if "load_weights" not in inspect.signature(get_object(target)).parameters:
        sources.append(f"encoder: {target} (called, then its tensors faked)")
        return faked(instantiate(node, context_dim=context_dim), mode)
    try:
        with within(mode):
            encoder = instantiate(node, context_dim=context_dim, load_weights=False)
    except Exception:
        if mode is None:
            raise
        # timm's constructors read values of tensors they just made (drop-path rates from a
        # linspace), which fake tensors do not have (the library's error hides the cause): built
        # for real with random weights, then faked. A config error fails here again, as itself.
        encoder = faked(instantiate(node, context_dim=context_dim, load_weights=False), mode)
    family = node.get("family", "clip")
    sources.append(f"encoder: {family} tower {node.get('arch')} from its config (no weights)")
    return encoder


def open_clip_config(arch: str) -> dict:
    """The open_clip model config of ``metrics_clip.arch`` (the metrics' CLIP): by name, or a
    ``local-dir:`` folder's (no weights read)."""
    if arch.startswith("local-dir:"):
        file = Path(arch.removeprefix("local-dir:")) / "open_clip_config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no open_clip config at {file}: fix metrics_clip.arch")
        return json.loads(file.read_text())["model_cfg"]
    config = open_clip.get_model_config(arch)
    if config is None:
        raise ValueError(
            f"metrics_clip.arch={arch} is not an open_clip model name "
            "(open_clip.list_models() lists them), nor local-dir:/folder"
        )
    return config


def clip_visual(model_cfg: dict) -> nn.Module:
    """The vision tower of an open_clip model config (the text tower is built, then dropped)."""
    config = dict(model_cfg)
    kind = open_clip.CustomTextCLIP if config.pop("custom_text", False) else open_clip.CLIP
    return kind(**config).visual


def faked(real, mode: FakeTensorMode | None):
    """``real`` (a module, or a dataclass of modules, built for this plan alone) with its
    parameters and buffers replaced by fake tensors of the same shapes, dtypes and flags."""
    if mode is None:
        return real
    modules = [real] if isinstance(real, nn.Module) else list(vars(real).values())
    for module in modules:
        for owner in module.modules():
            for name, param in owner._parameters.items():
                if param is not None:
                    owner._parameters[name] = nn.Parameter(
                        mode.from_tensor(param.detach()), requires_grad=param.requires_grad
                    )
            for name, buffer in owner._buffers.items():
                if buffer is not None:
                    owner._buffers[name] = mode.from_tensor(buffer)
    return real
