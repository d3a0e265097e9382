"""A probe of the random draws a training step really uses (``+callbacks.x._target_=``).

``DrawRecorder`` wraps, on its rank, the calls that draw: the DataModule's mask generator and
reference augmentation, the module's CFG dropout and the noise scheduler's ``add_noise``
(which receives the noise and timesteps the loss is computed on). After each training step
it appends one JSON line to ``{dirpath}/draws_rank{r}.jsonl``:

- ``t``, ``noise``: the timesteps and a digest of the noise the loss used;
- ``drop``: which samples lost their exemplar;
- ``mask_probe``, ``reference_probe``, ``dropout_probe``: what the generator handed to the
  mask, augmentation and dropout calls yields on a FIXED input (a twin of the generator, so
  the real call still draws exactly what it would have): equal probes mean equal draws,
  whatever the batch's images were;
- ``global_rng``: a digest of torch's global generator after the step.

It also records digests of the trainable weights in ``setup`` (as built) and at
``on_train_start`` (after DDP wrapped the model) in ``weights_rank{r}.json``; with
``perturb_rank`` that rank's weights are changed in ``setup``, before DDP wraps the model.
Lines are appended, so a killed and resumed run leaves both runs' steps in one file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch


def digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


def weights_digest(module: L.LightningModule) -> str:
    return digest(torch.cat([p.detach().flatten() for p in module.trainable_parameters()]))


@contextlib.contextmanager
def twin(generator: torch.Generator | None, device: torch.device) -> Iterator:
    """A generator that draws what ``generator`` draws next, leaving it untouched; for None
    (torch's global generator), the global state is forked and put back afterwards."""
    if generator is None:
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            yield None
        return
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    yield copy


class _Masks:
    def __init__(self, masks, recorder: DrawRecorder) -> None:
        self.masks, self.recorder = masks, recorder

    def __call__(self, object_boxes, mask_boxes, size, generator=None, **options):
        device = object_boxes.device
        boxes = torch.tensor([[0.3, 0.3, 0.7, 0.7]] * 8, device=device)
        enlarged = torch.tensor([[0.1, 0.1, 0.9, 0.9]] * 8, device=device)
        with twin(generator, device) as probe:
            self.recorder.pending["mask_probe"] = digest(self.masks(boxes, enlarged, 32, probe))
        return self.masks(object_boxes, mask_boxes, size, generator=generator, **options)


class _Augment:
    def __init__(self, augment, recorder: DrawRecorder) -> None:
        self.augment, self.recorder = augment, recorder

    def scene(self, image, mask, generator=None):
        return self.augment.scene(image, mask, generator=generator)

    def reference(self, reference, generator=None):
        device = reference.device
        ramp = torch.linspace(0, 1, 3 * 32 * 32, device=device).reshape(1, 3, 32, 32)
        fixed = ramp.expand(8, -1, -1, -1).contiguous()
        with twin(generator, device) as probe:
            probed = self.augment.reference(fixed, generator=probe)
        self.recorder.pending["reference_probe"] = digest(probed)
        return self.augment.reference(reference, generator=generator)


class DrawRecorder(L.Callback):
    def __init__(self, dirpath: str, perturb_rank: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.perturb_rank = perturb_rank
        self.pending: dict = {}
        self.step: dict | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.rank = trainer.global_rank
        self.weights = {"built": weights_digest(pl_module)}
        if self.perturb_rank == self.rank:
            with torch.no_grad():
                for parameter in pl_module.trainable_parameters():
                    parameter.add_(1.0)
            self.weights["perturbed"] = weights_digest(pl_module)
        datamodule = trainer.datamodule
        datamodule.masks = _Masks(datamodule.masks, self)
        datamodule.augment = _Augment(datamodule.augment, self)
        self._wrap_module(pl_module)

    def _wrap_module(self, module: L.LightningModule) -> None:
        add_noise, draw_dropout = module.noise_scheduler.add_noise, module.draw_dropout

        def recorded_add_noise(latents, noise, timesteps):
            if self.step is not None:
                self.step.update(t=timesteps.tolist(), noise=digest(noise))
            return add_noise(latents, noise, timesteps)

        def recorded_dropout(batch_size, generator=None):
            if self.step is not None:
                with twin(generator, module.device) as probe:
                    uniform = torch.rand(16, generator=probe, device=module.device)
                self.step["dropout_probe"] = digest(uniform)
            drop = draw_dropout(batch_size, generator)
            if self.step is not None:
                self.step["drop"] = drop.tolist()
            return drop

        module.noise_scheduler.add_noise = recorded_add_noise
        module.draw_dropout = recorded_dropout

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.weights["wrapped"] = weights_digest(pl_module)
        self.weights["global_rng"] = digest(torch.get_rng_state())
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"weights_rank{self.rank}.json").write_text(json.dumps(self.weights))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index = batch["stream_state"].index
        self.step = {"step": trainer.global_step, "index": index, **self.pending}
        self.pending = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step["global_rng"] = digest(torch.get_rng_state())
        with (self.dirpath / f"draws_rank{self.rank}.jsonl").open("a") as out:
            out.write(json.dumps(self.step) + "\n")
        self.step = None


def read_draws(dirpath: Path, rank: int) -> dict[int, dict]:
    """Step -> its draws on ``rank`` (a step taken twice, before a kill and after the resume,
    keeps its last record)."""
    lines = (dirpath / f"draws_rank{rank}.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}
