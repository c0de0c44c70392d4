"""The paper's colon U-Net experiment, end to end: switching losses on MSD Task10_Colon.

    python examples/msd_colon.py                       # embedded SYNTHETIC phantom, minutes on CPU
    python examples/msd_colon.py --download            # real data, the paper's protocol (preset)
    python examples/msd_colon.py --data-dir PATH/Task10_Colon --experiment table3 controls
    python examples/msd_colon.py --data-dir PATH/Task10_Colon --experiment all --seeds 0 1 2
    python examples/msd_colon.py --loss "iou->bce@50" --long-epochs 100
    torchrun --nproc_per_node=2 examples/msd_colon.py ...     # DDP (gloo on CPU, nccl on CUDA)

Without ``--data-dir``/``--download`` it generates a small synthetic CT phantom in the
Task10_Colon layout and runs the same pipeline on a scaled-down grid (one region loss, one
distribution loss, their composite, and the switch between them); with real data the ``paper``
preset is the default. Errors are reported in one line (exit status 2). See docs/example.md.
"""

from __future__ import annotations

import argparse
import errno
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _missing_extra(error: ModuleNotFoundError) -> int:
    """An ``[examples]`` requirement not installed: one line, as every error here (exit 2)."""
    if error.name is None or error.name.split(".")[0] in ("msd_colon_lib", "dynloss"):
        raise error
    print(f"msd_colon.py: error: it needs {error.name.split('.')[0]!r}, which is not installed: "
          'pip install -e ".[examples]" in the repository', file=sys.stderr, flush=True)
    return 2


try:
    from msd_colon_lib.experiments import DISTRIBUTION, EXPERIMENTS, REGION
    from msd_colon_lib.splits import SPLITS
except ModuleNotFoundError as missing:
    sys.exit(_missing_extra(missing))


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds an option's default to its help, unless the help already gives it or there is
    none to give (None, False: the preset decides)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or "default" in text):
            return text
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="msd_colon.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="the Task10_Colon folder (holding dataset.json)")
    g.add_argument("--download", action="store_true",
                   help="download, md5-verify and extract the MSD tar first")
    g.add_argument("--download-root",
                   help="with --download: where to put the tar (default: OUT/data)")
    g.add_argument("--image-size", type=int, help="slice size (paper: 256; demo: 64)")
    g.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"),
                   help="HU window scaled to [0, 1] (default -160 240)")
    g.add_argument("--max-cases", type=int, help="use only the first N cases (quick looks)")
    # the phantom's options default to None: given with --data-dir/--download, they are refused
    g.add_argument("--phantom-patients", type=int,
                   help="phantom (without --data-dir/--download): number of volumes (default 10)")
    g.add_argument("--phantom-seed", type=int, help="phantom: seed of the volumes (default 0)")
    g.add_argument("--phantom-size", type=int, help="phantom: in-plane voxels (default 128)")
    g.add_argument("--phantom-slices", type=int, nargs=2, metavar=("MIN", "MAX"),
                   help="phantom: slices per volume (default 24 32)")
    g = p.add_argument_group("protocol")
    g.add_argument("--preset", choices=("demo", "paper"),
                   help="demo: scaled-down embedded default; paper: the paper's protocol "
                        "(default: paper with --data-dir/--download, demo on the phantom)")
    g.add_argument("--experiment", nargs="+", choices=EXPERIMENTS, metavar="NAME",
                   help=f"what to run, one or more of: {', '.join(EXPERIMENTS)} (paper = "
                        "table1-4, beyond = controls switchpoints adaptive, all = both)")
    g.add_argument("--loss", action="append",
                   help='run these dynloss specs instead of a grid, e.g. "iou->bce@50" '
                        '(repeatable)')
    g.add_argument("--seeds", type=int, nargs="+", help="training seeds (mean ± std over them)")
    g.add_argument("--epochs", type=int, help="epochs of single-loss runs (paper: 50)")
    g.add_argument("--long-epochs", type=int,
                   help="epochs of composite and switching runs, and of the controls "
                        "(paper: 100)")
    g.add_argument("--switch-epoch", type=int,
                   help="epoch of the loss switch (default: --epochs; paper: 50)")
    g.add_argument("--switch-lr", choices=("keep", "restart"),
                   help="at the switch: keep LR and scheduler (default, the paper's protocol) "
                        "or restart the LR -- in every arm at the same epoch")
    g.add_argument("--pair", nargs=2, metavar=("REGION", "DISTRIBUTION"),
                   help=f"the pair of the demo, controls, switchpoints and adaptive "
                        f"(default iou bce; REGION in {'/'.join(REGION)}, DISTRIBUTION in "
                        f"{'/'.join(DISTRIBUTION)})")
    g.add_argument("--switch-fractions", type=float, nargs="+", metavar="F",
                   help="switchpoints: switch epochs as fractions of --long-epochs "
                        "(default 0.1 0.25 0.5 0.75)")
    g.add_argument("--adaptive-trigger", metavar="TRIGGER",
                   help="adaptive: the trigger of the switch (default plateau(patience=5%%, "
                        "min_epochs=10%%, max_epochs=75%% of --long-epochs))")
    # (defaults None, filled in later: --benchmark refuses them as given)
    g.add_argument("--split", choices=SPLITS,
                   help="patient: no patient on both sides; slice: what the paper's counts imply "
                        "(default patient)")
    g.add_argument("--split-seed", type=int, help="(default 0)")
    g.add_argument("--test-fraction", type=float, help="(default 0.2)")
    g.add_argument("--val-fraction", type=float,
                   help="part of the training set held out for ReduceLROnPlateau/best.pt; 0: "
                        "none, the scheduler monitors the training loss (demo: 0.1, paper: 0)")
    g.add_argument("--folds", type=int, help="folds of table4 (default 5)")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, help="global batch size (paper: 32)")
    g.add_argument("--lr", type=float, help="Adam learning rate (paper: 1e-4)")
    g.add_argument("--plateau-patience", type=int, help="ReduceLROnPlateau patience")
    g.add_argument("--precise-bn", type=int,
                   help="recompute BatchNorm statistics over N training batches before each "
                        "evaluation (demo: 8; paper: 0 = off)")
    g.add_argument("--monitor",
                   help="what ReduceLROnPlateau and best.pt watch: a validation metric "
                        "(dice_global, ...) or train_loss (default auto: dice_global with a "
                        "validation set, else train_loss)")
    g.add_argument("--encoder-weights",
                   help="imagenet | none | PATH to an encoder state_dict (demo: none; paper: "
                        "imagenet)")
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g.add_argument("--threads", type=int,
                   help="torch CPU threads per process, at least 1 (default: torch's choice, "
                        "or 1 when the CPU is already busy: spinning threads then cost far "
                        "more than they gain)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/msd_colon", help="output folder")
    g.add_argument("--resume", action="store_true",
                   help="continue unfinished runs from their last.pt; refused, naming the "
                        "differences, for a run whose options, data or code changed")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bars, no line per finished run (the report has them)")
    g.add_argument("--dry-run", action="store_true", help="print the runs of the grid and exit")
    g.add_argument("--benchmark", action="store_true",
                   help="time training steps (images/s, loss share) instead of training")
    g.add_argument("--benchmark-steps", type=int, default=30,
                   help="--benchmark: timed steps per loss (at least 1)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """Run the example; raises :class:`msd_colon_lib.errors.ExampleError` on bad input."""
    from msd_colon_lib.runner import run

    return run(parser().parse_args(argv))


FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
"""The errors of a full disk or quota: one line, like bad input."""


def cli(argv: list[str] | None = None) -> int:
    """:func:`main` for the command line: bad input is one line on stderr and exit status 2."""
    from msd_colon_lib.errors import ExampleError

    try:
        main(argv)
    except ExampleError as error:
        print(f"msd_colon.py: error: {error}", file=sys.stderr, flush=True)
        return 2
    except ModuleNotFoundError as error:
        return _missing_extra(error)
    except OSError as error:
        if error.errno not in FULL:
            raise
        where = f": {error.filename}" if error.filename else ""
        print(f"msd_colon.py: error: {error.strerror}{where}; free some space (or choose another "
              "--out) and rerun: --resume continues a run cut short", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("msd_colon.py: interrupted; rerun with --resume to continue the unfinished run",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
