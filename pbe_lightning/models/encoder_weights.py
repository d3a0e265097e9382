"""The exemplar encoder's families, and the local files each one reads.

One table says, per ``model.encoder.family``, which library builds the tower and what a folder
of its weights holds; :func:`weights_problems` turns a config's ``arch`` / ``checkpoint`` into
one line per problem naming the fix. The config checks call it before anything loads and the
loaders call it again, so both say the same. No torch here: checking a sweep's configs stays
a matter of milliseconds.

Nothing is ever downloaded: hub tags (``openai``, ``laion2b_s32b_b79k``) and ``hf-hub:`` names
are refused; weights come from a local file (``checkpoint``) or a ``local-dir:`` folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LOCAL_DIR = "local-dir:"
HUB = "hf-hub:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip / timm look for in a folder


@dataclass(frozen=True)
class Family:
    name: str
    library: str  # "open_clip" or "timm": the one that builds the tower
    folder_config: str  # the config file of a local-dir: folder
    example_file: str  # the weights file to name in messages
    cls_token: str  # what bottleneck=cls conditions on (documentation and messages)


FAMILIES = {
    "clip": Family(
        "clip",
        "open_clip",
        "open_clip_config.json",
        "open_clip_pytorch_model.bin",
        "the class token after ln_post, before CLIP's projection",
    ),
    "siglip": Family(
        "siglip",
        "open_clip",
        "open_clip_config.json",
        "open_clip_model.safetensors",
        "the attention-pool (MAP) head's output: SigLIP has no class token",
    ),
    "dinov2": Family(
        "dinov2",
        "timm",
        "config.json",
        "model.safetensors",
        "the class token after the final norm",
    ),
}


def family_of(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(
            f"model.encoder.family={name!r} is not an exemplar encoder family: use one of "
            f"{sorted(FAMILIES)} (model/encoder=clip_vit_l14|clip|openclip|siglip|dinov2)"
        )
    return FAMILIES[name]


def local_folder(arch: str) -> Path | None:
    """The folder of ``local-dir:<folder>``, else None."""
    return Path(arch.removeprefix(LOCAL_DIR)).expanduser() if arch.startswith(LOCAL_DIR) else None


def weights_problems(family: str, arch: object, checkpoint: object, fix: str) -> list[str]:
    """What is wrong with the weights ``model.encoder`` names, one line each ending in ``fix``
    (e.g. "or use model/encoder=tiny"); empty when the files are there."""
    spec = family_of(family)
    if not isinstance(arch, str) or not arch:
        return [f"model.encoder.arch is not set: name a {spec.library} model, {fix}"]
    if arch.startswith(HUB):
        return [
            f"model.encoder.arch={arch}: hub models are not downloaded (training must not depend "
            f"on the network): download the repository and pass model.encoder.arch="
            f"{LOCAL_DIR}/path/to/it, {fix}"
        ]
    folder = local_folder(arch)
    if folder is not None:
        return _folder_problems(spec, arch, folder, fix)
    return _file_problems(spec, arch, checkpoint, fix)


def _folder_problems(spec: Family, arch: str, folder: Path, fix: str) -> list[str]:
    if not (folder / spec.folder_config).is_file():
        return [
            f"model.encoder.arch={arch}: no {spec.library} model there (needs "
            f"{spec.folder_config} + weights): fix the path, {fix}"
        ]
    if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir()):
        return [
            f"model.encoder.arch={arch}: {spec.folder_config} but no weights file "
            f"({'/'.join(WEIGHT_SUFFIXES)}) in the folder, so the tower would be random: add "
            f"its {spec.example_file}, {fix}"
        ]
    return []


def _file_problems(spec: Family, arch: str, checkpoint: object, fix: str) -> list[str]:
    if not checkpoint:
        return [
            f"model.encoder.checkpoint is not set: pass model.encoder.checkpoint=/path/to/"
            f"{spec.example_file} (local weights for {arch}; nothing is downloaded), {fix}"
        ]
    if not Path(str(checkpoint)).expanduser().is_file():
        return [
            f"model.encoder.checkpoint={checkpoint}: no such file (local weights for {arch}): "
            f"fix the path, {fix}"
        ]
    return []
