"""Presets and the checks of the command-line options (each error names its option).

Two presets fill every option not given on the command line:

- ``demo``: the embedded default on the synthetic phantom, minutes on a CPU.
- ``paper``: the paper's protocol as far as it is described and the data allow: 256x256,
  batch 32, Adam 1e-4, 50 / 100 epochs, switch at 50, three seeds, Tables 1-4, ImageNet encoder
  weights (smp's default, which the paper kept), no validation set (the paper names only a
  train/test split) so the plateau scheduler monitors the training loss, and no LR change at
  the switch.

Without ``--preset``, real data (``--data-dir`` / ``--download``) use ``paper`` and the phantom
uses ``demo``; the report names the preset and why it was chosen.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any

from .errors import OptionsError
from .experiments import (
    DISTRIBUTION,
    REGION,
    SWITCH_FRACTIONS,
    default_trigger,
    expand,
    kind,
    switch_points,
)
from .phantom import is_phantom
from .training import MONITORS, TRAIN_LOSS

PRESETS: dict[str, dict[str, Any]] = {
    # the embedded default: runs in minutes on 2 CPU cores
    "demo": {
        "image_size": 64, "batch_size": 8, "lr": 1e-3, "epochs": 3, "long_epochs": 6,
        "experiment": ["demo"], "seeds": [0], "plateau_patience": 2,
        "precise_bn": 8, "val_fraction": 0.1, "encoder_weights": "none",
    },
    # the paper's protocol
    "paper": {
        "image_size": 256, "batch_size": 32, "lr": 1e-4, "epochs": 50, "long_epochs": 100,
        "experiment": ["paper"], "seeds": [0, 1, 2], "folds": 5,
        "plateau_patience": 5, "precise_bn": 0, "val_fraction": 0.0,
        "encoder_weights": "imagenet",
    },
}
PAPER_PROTOCOL: dict[str, Any] = {
    "switch_epoch": 50, "switch_lr": "keep", "max_cases": None, "test_fraction": 0.2,
}
"""The paper's values of the protocol's options that no preset sets (the switch at epoch 50 of
100 with the LR left to its scheduler, all 126 labelled cases, 10,788 / 2,698 = a fifth of the
slices for testing; docs/example.md)."""
BENCHMARK_LOSSES = ("iou", "bce", "iou+bce")
"""The losses ``--benchmark`` times when no ``--loss`` is given."""
GRID_OPTIONS = (("--experiment", "experiment"), ("--pair", "pair"),
                ("--switch-fractions", "switch_fractions"), ("--folds", "folds"),
                ("--adaptive-trigger", "adaptive_trigger"))
"""Options that choose the runs of the grid: --loss replaces the grid, so they do not apply."""
READERS = {"--folds": ("table4",), "--switch-fractions": ("switchpoints",),
           "--adaptive-trigger": ("adaptive",),
           "--pair": ("demo", "controls", "switchpoints", "adaptive")}
"""The experiments that read each grid option: given without any of them, it is refused."""
RUN_OPTIONS = (("--seeds", "seeds"), ("--epochs", "epochs"), ("--long-epochs", "long_epochs"),
               ("--switch-epoch", "switch_epoch"), ("--switch-lr", "switch_lr"))
"""Options of the training runs that ``--benchmark`` (which times steps) does not read."""
SPLIT_OPTIONS = (("--split", "split"), ("--split-seed", "split_seed"),
                 ("--test-fraction", "test_fraction"), ("--val-fraction", "val_fraction"),
                 ("--plateau-patience", "plateau_patience"), ("--precise-bn", "precise_bn"),
                 ("--monitor", "monitor"))
"""Options of the splits and of the LR schedule: ``--benchmark`` (steps on every slice, no
evaluation) does not read them."""
PHANTOM_OPTIONS = (("--phantom-patients", "phantom_patients"), ("--phantom-size", "phantom_size"),
                   ("--phantom-slices", "phantom_slices"), ("--phantom-seed", "phantom_seed"))
"""Options of the generated phantom: given data (--data-dir, --download) do not read them."""
DEFAULTS: dict[str, Any] = {
    "split": "patient", "split_seed": 0, "test_fraction": 0.2,
    "folds": 5, "plateau_patience": 5, "precise_bn": 0, "monitor": "auto", "switch_lr": "keep",
    "pair": ["iou", "bce"], "switch_fractions": list(SWITCH_FRACTIONS),
    "phantom_patients": 10, "phantom_size": 128, "phantom_slices": [24, 32], "phantom_seed": 0,
}
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
"""The values of --device."""


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Choose the preset (when not given) and fill every option left unset (None) from it."""
    data_dir = getattr(args, "data_dir", None)
    real = bool(data_dir or getattr(args, "download", False)) and not (
        data_dir and is_phantom(data_dir))
    if getattr(args, "preset", None) is None:
        args.preset = "paper" if real else "demo"
        args.preset_reason = ("the default for real data" if real
                              else "the default for the synthetic phantom")
    else:
        args.preset_reason = "--preset"
    # the grid's options that --loss replaces, as given (before the presets fill them)
    args.grid_options_given = [option for option, key in GRID_OPTIONS
                               if getattr(args, key, None) is not None]
    args.phantom_options_given = [option for option, key in PHANTOM_OPTIONS
                                  if getattr(args, key, None) is not None]
    args.run_options_given = [option for option, key in RUN_OPTIONS
                              if getattr(args, key, None) is not None]
    args.split_options_given = [option for option, key in SPLIT_OPTIONS
                                if getattr(args, key, None) is not None]
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    args.switch_epoch_given = args.switch_epoch is not None
    if args.switch_epoch is None:  # the paper: the single losses' 50 epochs of 100
        args.switch_epoch = args.epochs
    if args.monitor == "auto":
        args.monitor = TRAIN_LOSS if args.val_fraction == 0 else "dice_global"
    if getattr(args, "adaptive_trigger", None) is None:
        args.adaptive_trigger = default_trigger(args.long_epochs)
    return args


def _spec_error(option: str, spec: str, error: Exception) -> OptionsError:
    message = getattr(error, "message", None) or str(error).splitlines()[0]
    return OptionsError(f"{option} {spec!r}: {message}")


def _check_spec(option: str, spec: str) -> Any:
    import dynloss

    try:
        return dynloss.build_loss(spec)
    except (ValueError, TypeError) as error:
        raise _spec_error(option, spec, error) from error


def _check_trains(option: str, spec: str, loss: Any) -> None:
    """``loss`` takes what the training gives it, the U-Net's one channel of logits per pixel
    and a 0/1 float mask, and gives one number per batch: each of its losses (every stage of a
    switch, every term of a composite) is called once on a small batch of that form on the
    CPU (on the reference backend: checking options compiles nothing, and the backend a spec
    names is the device's matter). A spec that parses but cannot train
    (``mode='multiclass'``, ``from_logits=False``, ``reduction='none'``) failed with a
    traceback at the first training step."""
    import torch

    from dynloss import SegmentationLoss

    leaves = [module for module in loss.modules() if isinstance(module, SegmentationLoss)]
    shown = {id(module): repr(module) for module in [*leaves, loss]}  # (as the spec gave it)
    for module in leaves:  # (a backend is the device's matter: triton on CUDA, say)
        module.backend = "reference"
    logits = torch.linspace(-3.0, 3.0, 2 * 32 * 32).reshape(2, 1, 32, 32)
    masks = (torch.arange(2 * 32 * 32).reshape(2, 1, 32, 32) % 3 == 0).float()
    for module in [*leaves, loss]:
        try:
            value = module(logits, masks)
        except (ValueError, TypeError) as error:
            raise OptionsError(f"{option} {spec!r} cannot train the U-Net (one channel of "
                               f"logits per pixel, a 0/1 mask): {str(error).splitlines()[0]}"
                               ) from error
        if value.dim() != 0:
            shape = tuple(value.shape)
            raise OptionsError(f"{option} {spec!r}: the loss must give one number per batch, "
                               f"and {shown[id(module)]} gives a tensor of shape {shape} "
                               "(reduction='none' is for inspection)")


def _milestones(loss: Any) -> list[int]:
    """The fixed switch epochs (``@N``) of every SwitchingLoss in ``loss``, in order."""
    from dynloss import Milestone, SwitchingLoss

    return [trigger.at for module in loss.modules() if isinstance(module, SwitchingLoss)
            for trigger in module.triggers if isinstance(trigger, Milestone)]


def _earliest(trigger: Any) -> tuple[int, str]:
    """The fewest steps of its stage after which ``trigger`` can fire (a lower bound), and the
    argument that sets it (``"patience=10"``)."""
    from dynloss.schedules import Plateau, RelativeImprovement

    if isinstance(trigger, Plateau):  # num_bad counts at most one per step, from the first
        bounds = [(trigger.patience, f"patience={trigger.patience}")]
    elif isinstance(trigger, RelativeImprovement):  # no decision in the first `window` steps
        bounds = [(trigger.window + trigger.patience,
                   f"window={trigger.window} + patience={trigger.patience}")]
    else:  # a trigger of unknown kind: it may fire at its first step
        return 1, "its first step"
    soonest, why = max([*bounds, (trigger.min_epochs, f"min_epochs={trigger.min_epochs}"),
                        (1, "its first step")], key=lambda bound: bound[0])
    if trigger.max_epochs is not None and trigger.max_epochs < soonest:
        return trigger.max_epochs, f"max_epochs={trigger.max_epochs}"
    return soonest, why


def _never_switching(loss: Any, epochs: int) -> str | None:
    """Why the first adaptive trigger of ``loss`` that cannot fire within ``epochs`` epochs
    never does (None: every one can fire).

    A switching loss consults a trigger from the start of its stage, which begins at the
    earliest when the previous trigger could fire (a nested one: at the start of training, a
    lower bound); at most one switch happens per epoch. The training loop steps the loss after
    each epoch, so a switch at epoch ``epochs`` (after the last) trains no epoch of the next
    stage.
    """
    from dynloss import Milestone, SwitchingLoss

    for module in loss.modules():
        if not isinstance(module, SwitchingLoss):
            continue
        start = 0
        for trigger in module.triggers:
            if isinstance(trigger, Milestone):
                start = max(trigger.at, start + 1)
                continue
            steps, why = _earliest(trigger)
            if start:
                why = f"its stage begins at epoch {start} at the earliest, then {why}"
            start += steps
            if start >= epochs:
                return (f"its trigger {trigger!r} cannot switch before epoch {start} ({why}) "
                        f"of {epochs} epochs, so the switch never happens")
    return None


def _check_loss_run_options(args: argparse.Namespace, need: Any) -> None:
    """``--loss``: the run options given are read by some run (a single loss trains for
    ``--epochs``, a composite or switch for ``--long-epochs``; ``--switch-epoch`` is where the
    runs without a switch restart under ``--switch-lr restart``); else the report's Setup
    would state what no run did. (A restart that no run reaches is run, and the report says
    how many runs restarted.)"""
    given = set(getattr(args, "run_options_given", ()))
    plain = [spec for spec in args.loss if kind(spec) != "switch"]
    singles = [spec for spec in args.loss if kind(spec) == "single"]
    restarting = args.switch_lr == "restart" and bool(plain)
    named = ", ".join(map(repr, args.loss))
    # --epochs is also the default restart epoch of runs without a switch, where none switches
    restart_default = (restarting and not args.switch_epoch_given
                       and len(plain) == len(args.loss))
    need("--epochs" not in given or singles or restart_default,
         "--epochs does not apply to the --loss specs given: a single loss trains for --epochs "
         f"(a composite or switch for --long-epochs), and none of them ({named}) is one")
    need("--long-epochs" not in given or len(singles) < len(args.loss),
         "--long-epochs does not apply to the --loss specs given: a composite or switch trains "
         f"for --long-epochs (a single loss for --epochs), and none of them ({named}) is one")
    need(not args.switch_epoch_given or bool(plain),
         "--switch-epoch does not apply to the --loss specs given: with --switch-lr restart it "
         "is the epoch where the runs without a switch restart, and every one of them switches "
         "at its own")


def _check_loss_specs(args: argparse.Namespace, need: Any) -> None:
    """``--loss``: valid specs whose fixed switches happen within their runs; with
    ``--switch-lr restart`` the arms without a switch restart where the switching ones
    switch (``args.switch_epoch`` becomes that epoch)."""
    switches: set[int] = set()
    plain = False
    for spec in args.loss:
        loss = _check_spec("--loss", spec)
        _check_trains("--loss", spec, loss)
        epochs = args.epochs if kind(spec) == "single" else args.long_epochs
        for at in _milestones(loss):
            need(at < epochs, f"--loss {spec!r}: a switch at {at} of {epochs} epochs never "
                              f"happens (a switching run trains for --long-epochs = {epochs})")
        never = _never_switching(loss, epochs)
        need(never is None, f"--loss {spec!r}: {never} (a switching run trains for "
                            f"--long-epochs = {epochs})")
        if kind(spec) == "switch":
            switches.update(_milestones(loss)[:1])
        else:
            plain = True
    if args.switch_lr != "restart" or not plain or not switches:
        return
    need(len(switches) == 1,
         "--switch-lr restart: the runs without a switch restart where the switching runs "
         f"switch, but the --loss switches are at epochs {' and '.join(map(str, sorted(switches)))}"
         ": give one switch epoch per invocation")
    (at,) = switches
    need(not args.switch_epoch_given or args.switch_epoch == at,
         f"--switch-epoch {args.switch_epoch} and the --loss switch at {at} disagree: with "
         "--loss the switch is the spec's")
    args.switch_epoch = at


def validate(args: argparse.Namespace) -> None:
    """Raise :class:`OptionsError` naming the first invalid option (after :func:`apply_preset`)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise OptionsError(message)

    need(args.image_size >= 32 and args.image_size % 32 == 0,
         f"--image-size must be a positive multiple of 32 (the U-Net halves it five times); "
         f"got {args.image_size}")
    need(args.batch_size >= 2,
         f"--batch-size must be at least 2 (BatchNorm cannot train on one sample); "
         f"got {args.batch_size}")
    need(math.isfinite(args.lr) and args.lr > 0,
         f"--lr must be positive and finite; got {args.lr}")
    need(args.epochs >= 1, f"--epochs must be at least 1; got {args.epochs}")
    need(args.long_epochs >= 1, f"--long-epochs must be at least 1; got {args.long_epochs}")
    need(len(args.seeds) >= 1 and len(set(args.seeds)) == len(args.seeds),
         f"--seeds must be distinct; got {args.seeds}")
    need(min(args.seeds) >= 0, f"--seeds must be >= 0; got {args.seeds}")
    need(args.split_seed >= 0, f"--split-seed must be >= 0; got {args.split_seed}")
    need(args.folds >= 2, f"--folds must be at least 2; got {args.folds}")
    need(0 < args.test_fraction < 1, f"--test-fraction must be in (0, 1); got {args.test_fraction}")
    need(0 <= args.val_fraction < 1, f"--val-fraction must be in [0, 1); got {args.val_fraction}")
    need(args.plateau_patience >= 0,
         f"--plateau-patience must be >= 0; got {args.plateau_patience}")
    need(args.precise_bn >= 0, f"--precise-bn must be >= 0; got {args.precise_bn}")
    low, high = args.phantom_slices
    need(1 <= low <= high, f"--phantom-slices needs LOW <= HIGH, both at least 1; got {low} "
                           f"{high}")
    need(args.phantom_patients >= 1,
         f"--phantom-patients must be at least 1; got {args.phantom_patients}")
    need(args.phantom_size >= 1, f"--phantom-size must be at least 1; got {args.phantom_size}")
    need(args.phantom_seed >= 0, f"--phantom-seed must be >= 0; got {args.phantom_seed}")
    need(args.workers >= 0, f"--workers must be >= 0; got {args.workers}")
    need(args.threads is None or args.threads >= 1,
         f"--threads must be at least 1; got {args.threads}")
    need(args.benchmark_steps >= 1,
         f"--benchmark-steps must be at least 1; got {args.benchmark_steps}")
    need(DEVICE.fullmatch(args.device) is not None,
         f"--device must be auto, cpu, cuda or cuda:N; got {args.device!r}")
    need(args.max_cases is None or args.max_cases >= 1,
         f"--max-cases must be at least 1; got {args.max_cases}")
    if args.hu_window is not None:
        lo, hi = args.hu_window
        need(math.isfinite(lo) and math.isfinite(hi) and hi > lo,
             f"--hu-window needs finite LO < HI; got {lo} {hi}")
    need(args.monitor in MONITORS,
         f"--monitor must be auto or one of {', '.join(MONITORS)}; got {args.monitor!r}")
    need(args.monitor == TRAIN_LOSS or args.val_fraction > 0,
         f"--monitor {args.monitor} needs a validation set, but --val-fraction is 0: use "
         f"--monitor {TRAIN_LOSS} (or auto), or a --val-fraction above 0")
    weights = args.encoder_weights
    need(weights in ("none", "imagenet") or os.path.isfile(weights),
         f"--encoder-weights must be none, imagenet or the path of an encoder state_dict; "
         f"{weights!r} is none of these")
    region, distribution = args.pair
    need(region in REGION, f"--pair: the first loss must be one of {', '.join(REGION)}; "
                           f"got {region!r}")
    need(distribution in DISTRIBUTION,
         f"--pair: the second loss must be one of {', '.join(DISTRIBUTION)}; got {distribution!r}")
    need(all(0 < f < 1 for f in args.switch_fractions),
         f"--switch-fractions must lie in (0, 1); got {args.switch_fractions}")
    try:
        wanted = expand(args.experiment)
    except ValueError as error:
        raise OptionsError(f"--experiment: {error}") from error
    # the grid switches (Table 1's single losses and Table 2's composites do not)
    switching = not args.loss and any(w not in ("table1", "table2") for w in wanted)
    need(not args.switch_epoch_given or args.loss or switching or args.switch_lr == "restart",
         "--switch-epoch applies only to the experiments that switch, or with --switch-lr "
         f"restart; the chosen experiments ({' '.join(wanted)}) do not read it")
    if "switchpoints" in wanted and 1 <= args.switch_epoch < args.long_epochs:
        points = switch_points(args.long_epochs, args.switch_epoch, args.switch_fractions)
        shown = " ".join(f"{f:g}" for f in args.switch_fractions)
        need(points != [args.switch_epoch],
             f"--switch-fractions {shown} of --long-epochs {args.long_epochs} all fall on the "
             f"switch epoch {args.switch_epoch} (rounded, within 1 .. {args.long_epochs - 1}): "
             "the switch points have nothing to compare")
    if switching or args.switch_epoch_given:
        named = ("--switch-epoch" if args.switch_epoch_given
                 else f"--switch-epoch (default: --epochs = {args.epochs})")
        need(1 <= args.switch_epoch < args.long_epochs,
             f"{named} must lie in 1 .. --long-epochs - 1 = {args.long_epochs - 1} (a "
             f"switch at {args.switch_epoch} of {args.long_epochs} epochs never happens)")
    need(not (args.download and args.data_dir),
         "--download and --data-dir exclude each other: --data-dir reads an extracted "
         "Task10_Colon, --download fetches one (into --download-root)")
    need(args.download or args.download_root is None,
         "--download-root applies only with --download (it is where the tar is downloaded to)")
    source = "--data-dir" if args.data_dir else "--download" if args.download else None
    for option in getattr(args, "phantom_options_given", ()) if source else ():
        raise OptionsError(f"{option} applies only to the generated phantom; with {source} the "
                           "data are given")
    if getattr(args, "benchmark", False):
        ignored = [*getattr(args, "grid_options_given", ()),
                   *getattr(args, "run_options_given", ()),
                   *getattr(args, "split_options_given", ()),
                   *(["--resume"] if getattr(args, "resume", False) else [])]
        for option in ignored:
            raise OptionsError(f"{option} does not apply with --benchmark: it times training "
                               "steps of each --loss (default iou, bce and iou+bce)")
    if args.loss:
        for option in getattr(args, "grid_options_given", ()):
            raise OptionsError(f"{option} does not apply with --loss: --loss runs exactly the "
                               "given specs")
        need(not args.switch_epoch_given or args.switch_lr == "restart",
             "--switch-epoch does not apply with --loss: a spec's own @N is its switch (only "
             "--switch-lr restart reads it, for the runs without a switch)")
        _check_loss_specs(args, need)
        _check_loss_run_options(args, need)
    trigger = args.adaptive_trigger
    need(not trigger.strip().isdigit(),
         f"--adaptive-trigger {trigger!r} is a fixed epoch: use --switch-epoch for that, and a "
         "trigger such as plateau(patience=5) here")
    adaptive_spec = f"{region}->{distribution}@{trigger}"
    adaptive = _check_spec("--adaptive-trigger", adaptive_spec)
    stages = len(adaptive.stages)
    need(stages == 2, f"--adaptive-trigger {trigger!r} is not one trigger: the adaptive run "
                      f"would be {adaptive_spec!r}, a switch of {stages} stages")
    never = _never_switching(adaptive, args.long_epochs)
    need(args.loss or "adaptive" not in wanted or never is None,
         f"--adaptive-trigger {trigger!r}: {never} (the adaptive runs train for --long-epochs "
         f"= {args.long_epochs})")
    given = set(getattr(args, "run_options_given", ()))
    if not args.loss and not getattr(args, "benchmark", False):
        need("--long-epochs" not in given or bool(set(wanted) - {"table1"}),
             "--long-epochs applies only to the experiments with composite or switching runs; "
             f"the chosen experiments ({' '.join(wanted)}) do not read it")
        need("--epochs" not in given or bool(set(wanted) - {"table2"})
             or args.switch_lr == "restart",
             "--epochs applies only to the experiments with single-loss runs or a switch "
             "(whose epoch it sets by default); the chosen experiments "
             f"({' '.join(wanted)}) do not read it")
    for option in () if args.loss else getattr(args, "grid_options_given", ()):
        readers = READERS.get(option, ())
        if readers and not set(readers) & set(wanted):
            named = (readers[0] if len(readers) == 1
                     else f"{', '.join(readers[:-1])} or {readers[-1]}")
            raise OptionsError(f"{option} applies only to --experiment {named}; the chosen "
                               f"experiments ({' '.join(wanted)}) do not read it")


def check_device(args: argparse.Namespace) -> None:
    """``--device`` names a device this machine has (checked before any work, after
    ``--dry-run``, which only lists the runs: they may be meant for another machine)."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.device.startswith("cuda:"):
        # torchrun gives each rank its GPU by LOCAL_RANK; an index would be every rank's
        raise OptionsError(f"--device {args.device} under torchrun (WORLD_SIZE={world}) would "
                           f"put every rank on {args.device}; use --device cuda (rank "
                           "LOCAL_RANK takes cuda:LOCAL_RANK) and choose the GPUs with "
                           "CUDA_VISIBLE_DEVICES")
    wants_cuda = args.device.startswith("cuda") or (
        args.device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return
    if not torch.cuda.is_available():
        raise OptionsError(f"--device {args.device}: CUDA is not available on this machine; use "
                           "--device cpu (or auto)")
    count = torch.cuda.device_count()
    index = int(args.device.partition(":")[2] or 0)
    if index >= count:
        raise OptionsError(f"--device {args.device}: this machine has {count} CUDA device(s), "
                           f"cuda:0 .. cuda:{count - 1}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and local_rank >= count:
        raise OptionsError(f"--device {args.device} under torchrun: LOCAL_RANK={local_rank} but "
                           f"this machine has {count} CUDA device(s); start at most {count} "
                           "process(es) per node (torchrun --nproc-per-node)")
