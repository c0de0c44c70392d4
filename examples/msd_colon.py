"""The paper's colon U-Net experiment, end to end: switching losses on MSD Task10_Colon.

    python examples/msd_colon.py                       # embedded SYNTHETIC phantom, ~5 min on CPU
    python examples/msd_colon.py --download --preset paper          # the paper's protocol
    python examples/msd_colon.py --data-dir PATH/Task10_Colon --experiment table3 --seeds 0 1 2
    python examples/msd_colon.py --loss "iou->bce@50" --epochs 50 --long-epochs 100
    torchrun --nproc_per_node=2 examples/msd_colon.py ...     # DDP (gloo on CPU, nccl on CUDA)

Without ``--data-dir``/``--download`` it generates a small synthetic CT phantom in the
Task10_Colon layout and runs the same pipeline on a scaled-down grid (one region loss, one
distribution loss, their composite, and the switch between them). See docs/example.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from msd_colon_lib.experiments import EXPERIMENTS
from msd_colon_lib.splits import SPLITS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="msd_colon.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="the Task10_Colon folder (holding dataset.json)")
    g.add_argument("--download", action="store_true",
                   help="download, md5-verify and extract the MSD tar first")
    g.add_argument("--download-root", help="where to put the tar (default: OUT/data)")
    g.add_argument("--image-size", type=int, help="slice size (paper: 256; demo: 64)")
    g.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="HU window scaled to [0, 1] (default -160 240)")
    g.add_argument("--max-cases", type=int, help="use only the first N cases (quick looks)")
    g.add_argument("--phantom-patients", type=int, default=10, help="phantom: number of volumes")
    g.add_argument("--phantom-seed", type=int, default=0)
    g.add_argument("--phantom-size", type=int, default=128, help="phantom: in-plane voxels")
    g.add_argument("--phantom-slices", type=int, nargs=2, default=(24, 32), metavar=("MIN", "MAX"),
                   help="phantom: slices per volume")
    g = p.add_argument_group("protocol")
    g.add_argument("--preset", choices=("demo", "paper"), default="demo",
                   help="demo: scaled-down embedded default; paper: the paper's protocol")
    g.add_argument("--experiment", choices=EXPERIMENTS, help="which grid to run")
    g.add_argument("--loss", action="append",
                   help='run these dynloss specs instead of a grid, e.g. "iou->bce@50" '
                        '(repeatable)')
    g.add_argument("--seeds", type=int, nargs="+", help="training seeds (mean ± std over them)")
    g.add_argument("--epochs", type=int, help="epochs of single-loss runs (paper: 50)")
    g.add_argument("--long-epochs", type=int,
                   help="epochs of composite and switching runs (paper: 100)")
    g.add_argument("--switch-epoch", type=int, help="epoch of the loss switch (paper: 50)")
    g.add_argument("--split", choices=SPLITS, default="patient",
                   help="patient: no patient on both sides; slice: what the paper's counts imply")
    g.add_argument("--split-seed", type=int, default=0)
    g.add_argument("--test-fraction", type=float, default=0.2)
    g.add_argument("--val-fraction", type=float, default=0.1,
                   help="part of the training set held out for ReduceLROnPlateau/best.pt")
    g.add_argument("--folds", type=int, help="folds of table4 (default 5)")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, help="global batch size (paper: 32)")
    g.add_argument("--lr", type=float, help="Adam learning rate (paper: 1e-4)")
    g.add_argument("--plateau-patience", type=int, help="ReduceLROnPlateau patience")
    g.add_argument("--precise-bn", type=int,
                   help="recompute BatchNorm statistics over N training batches before each "
                        "evaluation (demo: 8; paper: 0 = off)")
    g.add_argument("--monitor", default="dice_global",
                   help="validation metric for ReduceLROnPlateau and best.pt")
    g.add_argument("--encoder-weights", default="none",
                   help="imagenet | none | PATH to an encoder state_dict")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--threads", type=int,
                   help="torch CPU threads per process (default: torch's choice, or 1 when "
                        "the CPU is already busy: spinning threads then cost far more than "
                        "they gain)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/msd_colon", help="output folder")
    g.add_argument("--resume", action="store_true",
                   help="continue unfinished runs from their last.pt (finished runs are "
                        "always skipped)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--dry-run", action="store_true", help="print the runs of the grid and exit")
    g.add_argument("--benchmark", action="store_true",
                   help="time training steps (images/s, loss share) instead of training")
    g.add_argument("--benchmark-steps", type=int, default=30)
    return p


def main(argv: list[str] | None = None) -> dict:
    from msd_colon_lib.runner import run

    return run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
