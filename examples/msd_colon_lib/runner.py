"""Glue: data -> slice store -> splits -> the runs of a grid -> report (what the CLI calls)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from . import experiments, splits
from .data import HU_WINDOW, SliceStore, build_slice_store
from .training import (
    BEST,
    RESULT,
    Dist,
    RunConfig,
    barrier,
    benchmark,
    broadcast,
    maybe_destroy,
    resolve_device,
    setup_distributed,
    train_run,
)

SYNTHETIC_BANNER = (
    "NOTE: no --data-dir/--download given, so this runs on a SYNTHETIC phantom (generated "
    "CT-like volumes in the Task10_Colon layout), not on patient data. The numbers show that the "
    "pipeline works, not what the paper claims."
)

PRESETS: dict[str, dict[str, Any]] = {
    # the embedded default: runs in minutes on 2 CPU cores
    "demo": {
        "image_size": 64, "batch_size": 8, "lr": 1e-3, "epochs": 3, "long_epochs": 6,
        "switch_epoch": 3, "experiment": "demo", "seeds": [0], "plateau_patience": 2,
        "precise_bn": 8,
    },
    # the paper's protocol
    "paper": {
        "image_size": 256, "batch_size": 32, "lr": 1e-4, "epochs": 50, "long_epochs": 100,
        "switch_epoch": 50, "experiment": "all", "seeds": [0, 1, 2], "folds": 5,
        "plateau_patience": 5, "precise_bn": 0,
    },
}


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every option left unset (None) from the preset."""
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    defaults = {"folds": 5, "plateau_patience": 5, "precise_bn": 0}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.switch_epoch is None:
        args.switch_epoch = args.epochs
    return args


def prepare_data(args: argparse.Namespace, d: Dist, out: Path) -> tuple[SliceStore, bool]:
    """The slice store and whether the data are synthetic."""
    synthetic = False
    if args.download:
        from .download import fetch_task10

        root = Path(args.download_root or out / "data")
        data_dir = fetch_task10(root, progress=d.main) if d.main else root / "Task10_Colon"
        barrier(d)
    elif args.data_dir:
        data_dir = Path(args.data_dir)
    else:
        from .phantom import make_phantom

        synthetic = True
        data_dir = out / "phantom" / "Task10_Colon"
        if d.main:
            print(SYNTHETIC_BANNER, flush=True)
            make_phantom(data_dir, n_patients=args.phantom_patients, seed=args.phantom_seed,
                         shape=(args.phantom_size, args.phantom_size),
                         slices=tuple(args.phantom_slices))
        barrier(d)
    window = tuple(args.hu_window) if args.hu_window else HU_WINDOW
    cache = out / "cache" / f"store_{args.image_size}_{int(window[0])}_{int(window[1])}"
    if synthetic:
        cache = cache.with_name(cache.name + "_phantom")
    if d.main:
        store = build_slice_store(
            data_dir, cache, size=args.image_size, hu_window=window,
            max_cases=args.max_cases, progress=True,
        )
    barrier(d)
    if not d.main:
        store = build_slice_store(data_dir, cache, size=args.image_size, hu_window=window,
                                  max_cases=args.max_cases, progress=False)
    return store, synthetic


def run_splits(args: argparse.Namespace, store: SliceStore, spec: experiments.RunSpec
               ) -> dict[str, np.ndarray]:
    if spec.fold is not None:
        folds = splits.kfold(store.patients, args.folds, args.split, args.split_seed)
        train, test = folds[spec.fold]
    else:
        train, test = splits.train_test_split(
            store.patients, args.split, args.test_fraction, args.split_seed
        )
    train, val = splits.subset_split(train, store.patients, args.val_fraction, args.split,
                                     args.split_seed + 1)
    return {"train": train, "val": val, "test": test}


def qualitative_slice(store: SliceStore, test: np.ndarray) -> int | None:
    """The test slice with the most tumour pixels (the same for every run of a split)."""
    pixels = np.asarray(store.meta["tumour_pixels"])[test]
    return int(test[int(np.argmax(pixels))]) if len(test) and pixels.max() > 0 else None


def _set_threads(args: argparse.Namespace) -> None:
    """``--threads``, or on a CPU run of a busy machine (load >= half the cores) 1 thread.

    On a shared CPU, intra-op threads wait for each other at every one of the thousands of
    small operations of an EfficientNet step; measured on a loaded 2-core machine, one thread
    ran a training step 5-10x faster than two.
    """
    import torch

    threads = args.threads
    if threads is None and args.device in ("auto", "cpu") and not torch.cuda.is_available():
        busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= 0.5 * (os.cpu_count() or 1)
        threads = 1 if busy else None
        if busy:
            print("CPU busy (load average >= half the cores): using 1 torch thread "
                  "(--threads N overrides)", flush=True)
    if threads:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    args = apply_preset(args)
    if args.dry_run:
        grid = experiments.plan(
            args.experiment, seeds=args.seeds, epochs=args.epochs, long_epochs=args.long_epochs,
            switch_epoch=args.switch_epoch, folds=args.folds, losses=args.loss or None,
        )
        for spec in grid:
            print(f"{spec.name}: loss {spec.loss!r}, {spec.epochs} epochs")
        print(f"{len(grid)} runs; image size {args.image_size}, batch {args.batch_size}, "
              f"lr {args.lr}, split {args.split}")
        return {"plan": grid, "args": args}
    _set_threads(args)
    d = setup_distributed(args.device)
    out = Path(args.out)
    with maybe_destroy(d):
        t0 = time.perf_counter()
        store, synthetic = prepare_data(args, d, out)
        if args.benchmark:
            return _benchmark(args, store, out, d)
        losses = args.loss or None
        grid = experiments.plan(
            args.experiment, seeds=args.seeds, epochs=args.epochs, long_epochs=args.long_epochs,
            switch_epoch=args.switch_epoch, folds=args.folds, losses=losses,
        )
        if d.main:
            print(f"{len(grid)} runs, {len(store)} slices "
                  f"({store.meta['n_tumour_slices']} with tumour), output: {out}", flush=True)
        results = []
        for spec in grid:
            split = run_splits(args, store, spec)
            cfg = RunConfig(
                loss=spec.loss, epochs=spec.epochs, batch_size=args.batch_size, lr=args.lr,
                seed=spec.seed, encoder_weights=args.encoder_weights, monitor=args.monitor,
                plateau_patience=args.plateau_patience, amp=args.amp, workers=args.workers,
                device=args.device, precise_bn=args.precise_bn,
                extra={"split": args.split, "split_seed": args.split_seed, "fold": spec.fold,
                       "image_size": args.image_size, "synthetic": synthetic},
            )
            run_dir = out / spec.name
            keep = qualitative_slice(store, split["test"]) if spec.fold is None else None
            res = train_run(
                cfg, store, split, run_dir, resume=args.resume,
                keep_slices=() if keep is None else (keep,), progress=not args.quiet,
                dist_info=d,
            )
            res = {**res, "_dir": str(run_dir)}
            results.append((spec, res))
            if d.main and not args.quiet:
                t = res["test"]
                print(f"  {spec.name}: test Dice global {t['dice_global']:.4f}, per patient "
                      f"{t['dice_patient']:.4f}, per slice {t['dice_slice']:.4f}", flush=True)
        report_path = None
        if d.main:
            from .report import write_report

            first = next((s for s, _ in results if s.fold is None), None)
            keep = None
            if first is not None:
                keep = qualitative_slice(store, run_splits(args, store, first)["test"])
            setup = {
                "data": "SYNTHETIC phantom (not patient data)"
                if synthetic
                else str(args.data_dir or "downloaded Task10_Colon"),
                "synthetic": synthetic,
                "slices": f"{len(store)} ({store.meta['n_tumour_slices']} with tumour), "
                          f"{len(store.patient_names)} patients",
                "image size": args.image_size,
                "HU window": list(args.hu_window or HU_WINDOW),
                "split": f"{args.split} (test fraction {args.test_fraction}, validation "
                         f"{args.val_fraction} of train, split seed {args.split_seed})",
                "model": f"smp Unet(efficientnet-b0, in_channels=3, classes=1), encoder weights "
                         f"{args.encoder_weights}",
                "optimiser": f"Adam lr {args.lr}, ReduceLROnPlateau(max {args.monitor}, "
                             f"patience {args.plateau_patience}) reset at the switch",
                "batch size": args.batch_size,
                "BatchNorm": (
                    f"precise BN over {args.precise_bn} training batches before each evaluation"
                    if args.precise_bn else "running statistics (smp default)"
                ),
                "epochs": f"single {args.epochs}, composite/switching {args.long_epochs}, "
                          f"switch at {args.switch_epoch}",
                "seeds": args.seeds,
                "device": str(resolve_device(args.device)),
                "wall time (s)": round(time.perf_counter() - t0, 1),
            }
            report_path = write_report(out, results, setup=setup, store=store,
                                       qualitative_slice=keep)
            print(f"report: {report_path}", flush=True)
            if synthetic:
                print(SYNTHETIC_BANNER, flush=True)
        return {"results": results, "report": report_path, "store": store}


def _benchmark(args: argparse.Namespace, store: SliceStore, out: Path, d: Dist) -> dict[str, Any]:
    """Time training steps for every ``--loss`` (default: ``iou``, ``bce``, ``iou+bce``)."""
    rows = []
    for spec in args.loss or ["iou", "bce", "iou+bce"]:
        cfg = RunConfig(loss=spec, epochs=1, batch_size=args.batch_size, lr=args.lr,
                        encoder_weights=args.encoder_weights, amp=args.amp, workers=args.workers,
                        device=args.device)
        row = benchmark(cfg, store, np.arange(len(store)), steps=args.benchmark_steps)
        rows.append({**row, "data": "synthetic phantom"})
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "benchmark.json").write_text(json.dumps(rows, indent=1))
        head = ("| loss | device | size | batch | amp | images/s | step ms | loss fwd+bwd ms | "
                "loss share |\n|---|---|---|---|---|---|---|---|---|\n")
        body = "".join(
            f"| `{r['loss']}` | {r['device']} | {r['image_size']} | {r['batch_size']} | "
            f"{r['amp']} | {r['images_per_s']:.1f} | {r['step_ms']:.2f} | "
            f"{r['loss_fwd_bwd_ms']:.3f} | {100 * r['loss_share_of_step']:.2f} % |\n"
            for r in rows
        )
        (out / "benchmark.md").write_text(
            "# examples/msd_colon.py --benchmark (synthetic phantom)\n\n"
            "Full training step (U-Net EfficientNet-B0 forward, loss, backward, Adam) timed "
            "without intermediate syncs; loss share = loss forward+backward on the step's "
            "detached logits, timed separately, over the step time.\n\n" + head + body
        )
        print(head + body, flush=True)
    return broadcast(d, {"rows": rows})


__all__ = ["BEST", "PRESETS", "RESULT", "apply_preset", "run"]
