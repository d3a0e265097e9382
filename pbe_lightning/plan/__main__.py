"""``python -m pbe_lightning.plan [train.py overrides]``: will this run fit, and how fast is it?

    python -m pbe_lightning.plan experiment=paper
    python -m pbe_lightning.plan experiment=paper memory=24gb --savings
    python -m pbe_lightning.plan experiment=paper trainer.precision=bf16-mixed --mfu 0.5

Takes the overrides train.py takes (same composition, same quoting); needs no GPU and reads
no weight file. The last line is ``peak memory per device: <X> GiB``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pbe_lightning.utils.console import quiet_console


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m pbe_lightning.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. experiment=paper")
    parser.add_argument(
        "--mfu",
        type=float,
        default=0.4,
        help="model FLOPs utilisation: the fraction of each GPU's peak dense rate the model's "
        "FLOPs (recomputation left out) run at (default 0.4)",
    )
    parser.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        help="device to plan for (default: cpu with trainer.accelerator=cpu, else cuda)",
    )
    parser.add_argument(
        "--savings",
        action="store_true",
        help="also plan what each memory choice saves (fp32 -> bf16 -> checkpointing -> 8-bit "
        "AdamW -> frozen bf16): three more planned steps, a few minutes",
    )
    parser.add_argument("--config-dir", help="the conf/ folder (default: ./conf, the checkout's)")
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error(f"--mfu {args.mfu}: a fraction in (0, 1], e.g. 0.4")
    return args, args.overrides


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    quiet_console()
    logging.getLogger("torch").setLevel(logging.ERROR)
    # Imported after parsing: --help answers at once, without loading torch.
    from pbe_lightning.plan import plan
    from pbe_lightning.plan.config import compose_train_config
    from pbe_lightning.plan.report import render
    from pbe_lightning.plan.savings import render_savings, savings

    cfg = compose_train_config(overrides, args.config_dir)
    result = plan(cfg, args.device)
    text = render(result, overrides, args.mfu)
    if args.savings:
        head, last = text.rsplit("\n", 1)
        rows = render_savings(savings(cfg, args.device, result))
        text = "\n".join([head.rstrip("\n"), *rows, "", last])
    print(text)


if __name__ == "__main__":
    main()
