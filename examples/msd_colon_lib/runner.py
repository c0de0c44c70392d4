"""Glue: options -> data -> slice store -> splits -> the runs of a grid -> report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from . import experiments, outlock, splits
from .data import HU_WINDOW, SliceStore, build_slice_store, open_store, read_cases
from .distributed import Dist, barrier, broadcast, maybe_destroy, resolve_device, setup_distributed
from .errors import ExampleError, OptionsError
from .options import (
    BENCHMARK_LOSSES,
    PAPER_PROTOCOL,
    PRESETS,
    apply_preset,
    check_device,
    validate,
)
from .phantom import is_phantom
from .training import RunConfig, train_run

SYNTHETIC_BANNER = (
    "NOTE: no --data-dir/--download given, so this runs on a SYNTHETIC phantom (generated "
    "CT-like volumes in the Task10_Colon layout), not on patient data. The numbers show that the "
    "pipeline works, not what the paper claims."
)

T = TypeVar("T")


def data_dir_note(data_dir: str | os.PathLike[str]) -> str:
    """The note on a ``--data-dir`` that holds this example's phantom."""
    return (f"NOTE: --data-dir {data_dir} holds a SYNTHETIC phantom (its dataset.json says so), "
            "not patient data: the numbers show that the pipeline works, not what the paper "
            "claims.")


def synthetic_note(args: argparse.Namespace) -> str:
    """What the run says, first and last, about its synthetic data: the generated phantom, or a
    phantom given with ``--data-dir``."""
    return data_dir_note(args.data_dir) if args.data_dir else SYNTHETIC_BANNER


def on_main(d: Dist, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0; an :class:`ExampleError` there is raised on every rank (so the
    other ranks do not wait at a barrier for a rank that has already given up)."""
    outcome: tuple[str, Any] = ("ok", None)
    if d.main:
        try:
            outcome = ("ok", fn())
        except ExampleError as error:
            outcome = ("error", (type(error), str(error)))
    status, value = broadcast(d, (outcome[0], None if outcome[0] == "ok" else outcome[1]))
    if status == "error":
        cls, message = value
        raise cls(message)
    return outcome[1] if d.main else None


def prepare_data(args: argparse.Namespace, d: Dist, out: Path) -> tuple[SliceStore, bool]:
    """The slice store and whether the data are synthetic (the phantom, generated here or
    given with --data-dir)."""
    synthetic = not (args.download or args.data_dir)
    if args.download:
        from .download import fetch_task10

        root = Path(args.download_root or out / "data")
        on_main(d, lambda: fetch_task10(root, progress=not args.quiet))
        data_dir = root / "Task10_Colon"
    elif args.data_dir:
        data_dir = Path(args.data_dir)
        if is_phantom(data_dir):
            synthetic = True
            if d.main:
                print(data_dir_note(data_dir), flush=True)
    else:
        from .phantom import make_phantom

        data_dir = out / "phantom" / "Task10_Colon"
        if d.main:
            print(synthetic_note(args), flush=True)
        on_main(d, lambda: make_phantom(
            data_dir, n_patients=args.phantom_patients, seed=args.phantom_seed,
            shape=(args.phantom_size, args.phantom_size), slices=tuple(args.phantom_slices)))
    window = tuple(args.hu_window) if args.hu_window else HU_WINDOW
    cache = out / "cache" / f"store_{args.image_size}"
    if synthetic:
        cache = cache.with_name(cache.name + "_phantom")
    on_main(d, lambda: build_slice_store(
        data_dir, cache, size=args.image_size, hu_window=window, max_cases=args.max_cases,
        progress=not args.quiet, digest_cache=out / "cache" / "digests.json",
        log=lambda line: print(line, flush=True),
    ))
    barrier(d)
    return open_store(cache), synthetic


def run_splits(args: argparse.Namespace, store: SliceStore, spec: experiments.RunSpec
               ) -> dict[str, np.ndarray]:
    """Train / validation / test slice indices of ``spec`` (its fold, or the 80/20 split)."""
    into = "" if spec.fold is None else f" into --folds {args.folds}"
    try:
        if spec.fold is not None:
            folds = splits.kfold(store.patients, args.folds, args.split, args.split_seed)
            train, test = folds[spec.fold]
        else:
            train, test = splits.train_test_split(
                store.patients, args.split, args.test_fraction, args.split_seed
            )
    except ValueError as error:
        raise OptionsError(f"cannot split {len(store.patient_names)} patients "
                           f"({len(store)} slices){into} with --split {args.split}: "
                           f"{error}") from error
    left = len(np.unique(np.asarray(store.patients)[train]))
    if args.val_fraction and args.split == "patient" and left < 2:
        # the validation split is a patient split of the training patients
        where = ("the test split" if spec.fold is None
                 else f"fold {spec.fold} of --folds {args.folds}")
        raise OptionsError(f"--val-fraction {args.val_fraction} needs at least 2 training "
                           f"patients; {where} left {left}: use --val-fraction 0 or more cases")
    try:
        train, val = splits.subset_split(train, store.patients, args.val_fraction, args.split,
                                         args.split_seed + 1)
    except ValueError as error:
        raise OptionsError(f"cannot split the {len(train)} training slices{into} with "
                           f"--val-fraction {args.val_fraction}, --split {args.split}: "
                           f"{error}") from error
    if len(train) < 2:
        raise OptionsError(f"the training set of {spec.name} has {len(train)} slice(s); use more "
                           "cases or a smaller --test-fraction / --val-fraction")
    return {"train": train, "val": val, "test": test}


def qualitative_slice(store: SliceStore, test: np.ndarray) -> int | None:
    """The test slice with the most tumour pixels (the same for every run of a split).

    Chosen from the ground truth alone, before and independently of any prediction; ties go to
    the lowest slice index.
    """
    pixels = np.asarray(store.meta["tumour_pixels"])[test]
    return int(test[int(np.argmax(pixels))]) if len(test) and pixels.max() > 0 else None


def run_config(args: argparse.Namespace, spec: experiments.RunSpec, synthetic: bool
               ) -> RunConfig:
    """The :class:`RunConfig` of one run of the grid."""
    import torch

    switch_lr, restart_at = args.switch_lr, None
    if args.switch_lr == "restart" and experiments.kind(spec.loss) != "switch":
        if args.switch_epoch < spec.epochs:  # the same warm restart as the switching runs
            restart_at = args.switch_epoch
        else:  # the run ends before the restart (Table 1's 50 of 100 epochs): nothing happens
            switch_lr = "keep"
    extra: dict[str, Any] = {
        "split": args.split, "split_seed": args.split_seed, "test_fraction": args.test_fraction,
        "val_fraction": args.val_fraction, "fold": spec.fold, "image_size": args.image_size,
        "hu_window": list(args.hu_window or HU_WINDOW), "max_cases": args.max_cases,
        "synthetic": synthetic,
        # torch's intra-op thread count changes the numbers (the order of float sums)
        "threads": torch.get_num_threads(),
    }
    if spec.fold is not None:
        extra["folds"] = args.folds
    return RunConfig(
        loss=spec.loss, epochs=spec.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=spec.seed, encoder_weights=args.encoder_weights, monitor=args.monitor,
        plateau_patience=args.plateau_patience, switch_lr=switch_lr,
        restart_at=restart_at, amp=args.amp, workers=args.workers, device=args.device,
        precise_bn=args.precise_bn, extra=extra,
    )


THREADS_FILE = "threads.json"
"""In ``--out``: the thread count of the last invocation there."""


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads``, else the count the last invocation on ``--out`` used, else on a CPU run
    of a busy machine (load >= half the cores) 1 thread.

    On a shared CPU, intra-op threads wait for each other at every one of the thousands of
    small operations of an EfficientNet step; measured on a loaded 2-core machine, one thread
    ran a training step 5-10x faster than two. The count is one of a run's inputs (it orders
    the float sums), so it is written to ``OUT/threads.json`` (by :func:`_record_threads`, when
    the first run trains) and kept by the next invocation that does not say ``--threads``: a
    run started on a busy CPU resumes, and is reused, once the load drops.
    """
    import torch

    recorded = Path(args.out) / THREADS_FILE
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    else:
        try:
            threads = json.loads(recorded.read_text())["threads"]
        except (OSError, ValueError, KeyError, TypeError):
            threads = None
        if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1:
            torch.set_num_threads(threads)
            print(f"using {threads} torch thread{'s' if threads > 1 else ''}, the count the "
                  "runs in this --out were started with (--threads N overrides)", flush=True)
        elif args.device in ("auto", "cpu") and not torch.cuda.is_available() and (
                hasattr(os, "getloadavg")
                and os.getloadavg()[0] >= 0.5 * (os.cpu_count() or 1)):
            torch.set_num_threads(1)
            print("CPU busy (load average >= half the cores): using 1 torch thread "
                  "(--threads N overrides)", flush=True)


def _record_threads(out: Path) -> None:
    """Write this invocation's thread count to ``OUT/threads.json`` (see :func:`_set_threads`):
    when a run is about to train, not before, so that an invocation refused before any run
    changed (a mismatched ``--resume``) leaves the count its runs were started with."""
    import torch

    recorded = out / THREADS_FILE
    tmp = recorded.with_name(f".{THREADS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"threads": torch.get_num_threads()}))
    os.replace(tmp, recorded)


def _plan(args: argparse.Namespace) -> list[experiments.RunSpec]:
    return experiments.plan(
        args.experiment, seeds=args.seeds, epochs=args.epochs, long_epochs=args.long_epochs,
        switch_epoch=args.switch_epoch, folds=args.folds, losses=args.loss or None,
        demo_pair=tuple(args.pair), fractions=args.switch_fractions,
        trigger=args.adaptive_trigger,
    )


def _check_encoder_weights(args: argparse.Namespace) -> None:
    """Load the encoder weights once before the data (ImageNet: download or fail clearly)."""
    if args.encoder_weights == "none":
        return
    from .model import build_model

    build_model(encoder_weights=args.encoder_weights)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the CLI does: options, data, the runs of the grid, the report."""
    args = apply_preset(args)
    validate(args)
    grid = _plan(args)
    unique = experiments.unique_runs(grid)
    if args.dry_run and args.benchmark:
        losses = ", ".join(map(repr, args.loss or BENCHMARK_LOSSES))
        print(f"benchmark: {args.benchmark_steps} timed training steps of each loss: {losses}")
        return {"plan": [], "args": args}
    if args.dry_run:
        for spec in unique:
            sections = sorted({s.table for s in grid if s.name == spec.name})
            print(f"{spec.name}: loss {spec.loss!r}, {spec.epochs} epochs "
                  f"({', '.join(sections)})")
        print(f"{len(unique)} runs; preset {args.preset}, image size {args.image_size}, batch "
              f"{args.batch_size}, lr {args.lr}, split {args.split}, encoder weights "
              f"{args.encoder_weights}, switch LR {args.switch_lr}")
        return {"plan": grid, "args": args}
    check_device(args)
    d = setup_distributed(args.device)
    out = Path(args.out)
    with maybe_destroy(d), contextlib.ExitStack() as held:
        # one invocation per --out at a time, from before anything is written there (rank 0
        # holds it for all; a refusal stops every rank)
        on_main(d, lambda: held.enter_context(outlock.hold(out)))
        _set_threads(args)
        if d.main and args.amp in ("bf16", "fp16") and resolve_device(
                args.device, d.local_rank).type != "cuda":
            print(f"--amp {args.amp}: mixed precision is used on CUDA only; the runs on the CPU "
                  "train in float32", flush=True)
        if args.batch_size // d.world < 2:
            raise OptionsError(f"--batch-size {args.batch_size} over {d.world} processes leaves "
                               "fewer than 2 slices per process; BatchNorm needs 2")
        t0 = time.perf_counter()
        if args.data_dir:  # a mistyped folder, named before the weights' download can fail
            on_main(d, lambda: read_cases(args.data_dir))
        on_main(d, lambda: _check_encoder_weights(args))
        store, synthetic = prepare_data(args, d, out)
        if args.benchmark:
            from .benchmark import run_benchmark

            return run_benchmark(args, store, out, d, synthetic)
        # every run's split (the k folds need k patients) before the first run trains
        run_split = {spec.name: run_splits(args, store, spec) for spec in unique}
        if d.main:
            print(f"{len(unique)} runs, {len(store)} slices "
                  f"({store.meta['n_tumour_slices']} with tumour), preset {args.preset}, "
                  f"output: {out}", flush=True)
        changing = False

        def before_change() -> None:
            """The first run that trains (not one reused or refused: an invocation that stops
            before changes no run, and keeps the report and the recorded thread count)."""
            nonlocal changing
            if not changing:
                changing = True
                _remove_previous_report(out)
                _record_threads(out)

        done: dict[str, dict[str, Any]] = {}
        for spec in unique:
            split = run_split[spec.name]
            keep = qualitative_slice(store, split["test"]) if spec.fold is None else None
            res = train_run(
                run_config(args, spec, synthetic), store, split, out / spec.name,
                resume=args.resume, keep_slices=() if keep is None else (keep,),
                progress=not args.quiet, dist_info=d,
                log=(lambda line: print(line, flush=True)) if d.main else None,
                before_change=before_change,
            )
            done[spec.name] = {**res, "_dir": str(out / spec.name)}
            if d.main and not args.quiet:
                print(summary_line(spec.name, spec.loss, res["test"]), flush=True)
        results = [(spec, done[spec.name]) for spec in grid]
        report_path = None
        if d.main:
            if not changing:  # every run reused: no figure of the last report stays beside it
                _remove_previous_report(out)
            report_path = _write_report(args, out, results, store, synthetic, t0)
            print(f"report: {report_path}", flush=True)
            if synthetic:
                print(synthetic_note(args), flush=True)
        return {"results": results, "report": report_path, "store": store}


def summary_line(name: str, loss: str, test: dict[str, Any]) -> str:
    """The one line printed after a run; a metric that is NaN or None (no tumour in the test
    set and none predicted: the per-patient Dice has no patient to average) reads n/a."""
    def shown(value: Any) -> str:
        return "n/a" if value is None or value != value else f"{value:.4f}"

    return (f"  {name} ({loss}): test Dice global {shown(test['dice_global'])}, per patient "
            f"{shown(test['dice_patient'])}, per slice {shown(test['dice_slice'])}")


REPORT_FILES = ("report.md", "runs.csv", "loss_curves.png", "qualitative.png")
"""What :func:`_write_report` writes under --out at the end of a run."""


def _remove_previous_report(out: Path) -> None:
    """Remove the report of an earlier run in ``out`` before the first run trains: it is
    written again only at the end, and a run that fails or is killed midway must not leave the
    old one beside its new results, looking complete. (An invocation refused before that, a
    mistyped option or folder or a ``--resume`` of a run with other inputs, keeps it: no run
    changed.)"""
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)


def paper_deviations(args: argparse.Namespace) -> list[str]:
    """With the ``paper`` preset, the options whose values differ from the paper's protocol
    (``--image-size 32 (the paper's 256)``, ...); the experiments chosen are not one."""
    if args.preset != "paper":
        return []
    protocol = {key: value for key, value in PRESETS["paper"].items() if key != "experiment"}
    protocol.update(PAPER_PROTOCOL)
    if not getattr(args, "switch_epoch_given", True):  # it follows --epochs, compared above
        del protocol["switch_epoch"]
    out = []
    for key, paper in protocol.items():
        value = getattr(args, key, paper)
        if value != paper:
            said = "all 126 cases" if key == "max_cases" else _as_option(paper)
            out.append(f"--{key.replace('_', '-')} {_as_option(value)} (the paper's {said})")
    return out


def _as_option(value: Any) -> str:
    """An option's value as it is typed (a list: its items separated by spaces)."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def trained_seeds(grid: list[experiments.RunSpec]) -> list[int]:
    """The seeds the grid's runs train with (Table 4's cross-validation: the first of
    ``--seeds`` only, its folds being its repeats)."""
    return sorted({spec.seed for spec in grid})


def _qualitative_info(args: argparse.Namespace, store: SliceStore,
                      results: list[tuple[experiments.RunSpec, dict[str, Any]]]
                      ) -> dict[str, Any] | None:
    first = next((s for s, _ in results if s.fold is None), None)
    if first is None:
        return None
    test = run_splits(args, store, first)["test"]
    k = qualitative_slice(store, test)
    if k is None:
        return None
    return {
        "slice": k,
        "patient": store.patient_names[int(store.patients[k])],
        "tumour_pixels": int(store.meta["tumour_pixels"][k]),
        "test_slices": len(test),
    }


def restart_count(results: list[tuple[experiments.RunSpec, dict[str, Any]]]) -> tuple[int, int]:
    """How many runs restarted their LR, and how many runs there are: a run that serves
    several sections of the report (one folder) counts once."""
    by_run = {spec.name: res for spec, res in results}
    return sum(1 for res in by_run.values() if res.get("lr_restarts")), len(by_run)


def _write_report(args: argparse.Namespace, out: Path,
                  results: list[tuple[experiments.RunSpec, dict[str, Any]]], store: SliceStore,
                  synthetic: bool, t0: float) -> Path:
    from .report import write_report

    mode = "min" if args.monitor == "train_loss" else "max"
    val = (f"{args.val_fraction} of the training set held out for validation"
           if args.val_fraction else "none (all training slices are trained on)")
    restarted, trained = restart_count(results)
    restart = ("**restart**: at the loss switch of a switching run, and at epoch "
               f"{args.switch_epoch} of every other run that trains beyond it, the LR returns "
               f"to {args.lr} and the plateau history is forgotten (the same warm restart in "
               f"every arm; {restarted} of {trained} runs restarted here)"
               if args.switch_lr == "restart" else
               "**keep**: nothing happens to the LR or the scheduler at the switch (the paper "
               "describes no LR change)")
    setup = {
        "preset": f"`{args.preset}` ({args.preset_reason})",
        "data": "SYNTHETIC phantom (not patient data)"
        if synthetic else str(args.data_dir or "downloaded Task10_Colon"),
        "synthetic": synthetic,
        "slices": f"{len(store)} ({store.meta['n_tumour_slices']} with tumour), "
                  f"{len(store.patient_names)} patients",
        "image size": args.image_size,
        "HU window": list(args.hu_window or HU_WINDOW),
        "split": f"by {args.split} (test fraction {args.test_fraction}, split seed "
                 f"{args.split_seed})",
        "validation set": val,
        "model": f"smp Unet(efficientnet-b0, in_channels=3, classes=1), encoder weights "
                 f"{args.encoder_weights}",
        "optimiser": f"Adam lr {args.lr}, ReduceLROnPlateau({mode} {args.monitor}, patience "
                     f"{args.plateau_patience}, factor 0.1)",
        "LR at the switch (--switch-lr)": restart,
        "batch size": args.batch_size,
        "BatchNorm": (
            f"precise BN over {args.precise_bn} training batches before each evaluation"
            if args.precise_bn else "running statistics (smp default)"
        ),
        "epochs": f"single {args.epochs}, composite/switching {args.long_epochs}, "
                  + ("switches as the --loss specs give them" if args.loss
                     else f"switch at {args.switch_epoch}"),
        "seeds": trained_seeds([spec for spec, _ in results]),
        "device": str(resolve_device(args.device)),
        "wall time (s)": round(time.perf_counter() - t0, 1),
    }
    context = {
        "epochs": args.epochs, "long_epochs": args.long_epochs,
        "switch_epoch": args.switch_epoch, "preset": args.preset,
        "deviations": paper_deviations(args),
        "experiments": experiments.expand(args.experiment) if not args.loss else ["--loss"],
    }
    return write_report(out, results, setup=setup, store=store,
                        qualitative=_qualitative_info(args, store, results), context=context)


__all__ = ["PRESETS", "SYNTHETIC_BANNER", "apply_preset", "qualitative_slice", "run"]
