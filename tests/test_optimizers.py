"""memory=24gb's 8-bit AdamW (bitsandbytes, which runs it on the CPU too): its update against
torch's AdamW, the recipe's non-finite-step skip with it, and the refusal without the library."""

from __future__ import annotations

import sys

import pytest
import torch

from pbe_lightning.models.module import nonfinite_gradients, skip_update_if
from pbe_lightning.models.optimizers import ADAMW_8BIT, adamw_8bit
from pbe_lightning.utils.config_checks import config_problems

SETTINGS = dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)


def trained_displacement(make, steps: int = 10) -> tuple[torch.Tensor, torch.optim.Optimizer]:
    """``steps`` updates on a quadratic whose curvatures span three decades (64 x 1024
    weights: above bitsandbytes' 4096-element threshold for 8-bit state)."""
    target = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    curvature = torch.logspace(-2, 1, 1024)
    start = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1))
    param = torch.nn.Parameter(start.clone())
    optimizer = make([param])
    for _ in range(steps):
        optimizer.zero_grad()
        ((param - target) ** 2 * curvature).mean().backward()
        optimizer.step()
    return param.detach() - start, optimizer


def test_adamw_8bit_follows_torch_adamw() -> None:
    """Tolerance: bitsandbytes keeps both moments in 8 bits per value, blockwise-scaled on a
    256-entry dynamic map, so the update m/sqrt(v) carries a few per cent of error per element
    (2.8 % of the displacement here); a 10 % error in lr or weight decay moves it by ~10 %, a
    wrong eps by ~90 %. (Over ten steps Adam hardly depends on betas: not checked here.)"""
    exact, _ = trained_displacement(lambda p: torch.optim.AdamW(p, **SETTINGS))
    compact, optimizer = trained_displacement(lambda p: adamw_8bit(p, fused=True, **SETTINGS))
    assert (compact - exact).norm() / exact.norm() < 0.05
    state = next(iter(optimizer.state.values()))
    state_bytes = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    assert state_bytes < 2.1 * exact.numel()  # torch's AdamW: 8 bytes per weight


def test_a_nonfinite_step_is_skipped_with_8bit_adamw() -> None:
    """The recipe's ``fused: true`` is accepted and ignored; bitsandbytes cannot skip inside
    its kernel, so the module's check drops the gradients (after a host read) and the step
    leaves weights and moments as they were."""
    param = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = adamw_8bit([param], lr=1e-2, fused=True)

    def step(grad: torch.Tensor) -> None:
        param.grad = grad
        skip_update_if(optimizer, nonfinite_gradients([param]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(torch.ones_like(param))
    before = param.detach().clone()
    moments = {k: v.clone() for k, v in optimizer.state[param].items() if torch.is_tensor(v)}
    poisoned = torch.ones_like(param)
    poisoned[3, 5] = float("nan")
    step(poisoned)
    assert torch.equal(param.detach(), before)
    for key, value in moments.items():
        assert torch.equal(optimizer.state[param][key], value), key
    step(torch.ones_like(param))
    assert torch.isfinite(param).all() and not torch.equal(param.detach(), before)


def test_without_bitsandbytes_the_preset_is_refused_with_the_fix(tiny_cfg, monkeypatch) -> None:
    # What an environment without it has (its submodules too: other tests imported them).
    for name in [n for n in sys.modules if n.split(".")[0] == "bitsandbytes"] + ["bitsandbytes"]:
        monkeypatch.setitem(sys.modules, name, None)
    cfg = tiny_cfg("memory=24gb")
    assert cfg.model.optimizer._target_ == ADAMW_8BIT
    expected = (
        f"model.optimizer._target_={ADAMW_8BIT} (memory=24gb) needs bitsandbytes, which is not "
        "installed: pip install bitsandbytes, or model.optimizer._target_=torch.optim.AdamW"
    )
    assert expected in config_problems(cfg)
    assert not any("bitsandbytes" in p for p in config_problems(tiny_cfg()))
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        adamw_8bit([torch.nn.Parameter(torch.zeros(3))])
