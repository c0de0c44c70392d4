"""One training run: smp U-Net (EfficientNet-B0), Adam, ReduceLROnPlateau, a dynloss loss.

- The loss is built from a spec string with :func:`dynloss.build_loss` (``"iou"``,
  ``"tversky+bce"``, ``"iou->bce@50"``, ``"iou->bce@plateau(patience=5)"``) and stepped once
  per epoch with the epoch's mean training loss (what adaptive triggers watch).
- ReduceLROnPlateau watches ``monitor``: a validation metric (mode max; default global Dice)
  or ``train_loss`` (mode min; the only choice without a validation set).
- ``switch_lr``: ``keep`` (default; the paper describes no LR change at the switch) leaves LR
  and scheduler alone at the switch. ``restart`` restores the initial LR and forgets the plateau
  history (:func:`dynloss.reset_plateau_scheduler`) -- at the loss switch of a switching run,
  and at epoch ``restart_at`` of every other run, so that every arm of a comparison gets the
  same warm restart.
- A training batch of one slice is never formed (BatchNorm cannot normalise one sample at the
  1x1 bottleneck): when the epoch would end on one, that slice sits the epoch out.
- CUDA: AMP (bf16 where supported, else fp16 with a GradScaler) and channels_last.
- Seeded: model init from ``seed``; batch order from a generator seeded by (seed, epoch), so
  an interrupted run resumed from its last checkpoint reproduces the uninterrupted run.
- Checkpoints: ``last.pt`` every epoch (model, optimizer, scheduler, scaler, loss, RNG, best
  value and epoch, history) and ``best.pt`` on a new best monitored value, both written
  atomically (temporary file + ``os.replace``) and read with ``weights_only=True``.
- Fingerprint: everything that determines the result (the result-affecting options, the split's
  slice indices, the slice store's fingerprint, the code, the world size) is stored in
  ``config.json`` and ``result.json``. A finished run is reused only when it matches;
  otherwise it is recomputed, or, under ``resume``, refused with the differences named.
- DDP under ``torchrun`` (gloo on CPU, nccl on CUDA): rank 0 evaluates, logs and saves;
  the monitored value is broadcast so every rank steps the same schedules.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import SliceDataset, SliceStore
from .distributed import Dist, barrier, broadcast, mean_across, resolve_device
from .errors import MismatchError, OptionsError, first_line
from .evaluation import METRIC_KEYS, predict_counts, summarize
from .fingerprint import code_version, describe, differences, sha256_file, sha256_json
from .model import autocast_dtype, build_loss, build_model, recalibrate_bn, stage_info, term_values

RESULT = "result.json"
LAST = "last.pt"
BEST = "best.pt"
CONFIG = "config.json"
LOG = "log.jsonl"
PREDICTIONS = "predictions.npz"
TRAIN_LOSS = "train_loss"
MONITORS = (TRAIN_LOSS, *METRIC_KEYS)
SWITCH_LR = ("keep", "restart")


@dataclass
class RunConfig:
    """Everything that defines one run (saved to ``config.json`` beside the checkpoints)."""

    loss: str
    epochs: int
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    encoder: str = "efficientnet-b0"
    encoder_weights: str | None = None
    monitor: str = "dice_global"
    plateau_patience: int = 5
    plateau_factor: float = 0.1
    plateau_threshold: float = 1e-4
    switch_lr: str = "keep"
    restart_at: int | None = None
    """``switch_lr="restart"``: the epoch at which a run *without* a loss switch restarts its LR
    (the switch epoch of the runs it is compared with)."""
    amp: str = "auto"
    workers: int = 0
    device: str = "auto"
    eval_batch_size: int = 64
    precise_bn: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    # how a result is computed, not what it is: not part of the fingerprint (--workers is:
    # runs with 0 and 2 loader processes were seen to train other numbers)
    NOT_IN_FINGERPRINT = ("device", "eval_batch_size")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result_options(self) -> dict[str, Any]:
        """The options that change the result (all but the device and eval batch size)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.NOT_IN_FINGERPRINT}

    @property
    def monitor_mode(self) -> str:
        """``min`` for the training loss, ``max`` for a validation metric."""
        return "min" if self.monitor == TRAIN_LOSS else "max"


def check_config(cfg: RunConfig, n_val: int) -> None:
    """Raise :class:`OptionsError` for a config that cannot run."""
    if cfg.monitor not in MONITORS:
        raise OptionsError(f"--monitor must be one of {', '.join(MONITORS)}; got {cfg.monitor!r}")
    if cfg.monitor != TRAIN_LOSS and n_val == 0:
        raise OptionsError(
            f"--monitor {cfg.monitor} needs a validation set; with --val-fraction 0 the "
            f"scheduler can only monitor {TRAIN_LOSS}"
        )
    if cfg.switch_lr not in SWITCH_LR:
        raise OptionsError(f"--switch-lr must be keep or restart; got {cfg.switch_lr!r}")


# ----------------------------------------------------------------------------- fingerprint


def _indices(indices: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(np.asarray(indices, dtype=np.int64))
    return {"n": len(arr), "sha256": sha256_json(arr.tolist())[:16]}


def run_fingerprint(cfg: RunConfig, store: SliceStore, splits: dict[str, np.ndarray],
                    world: int = 1, device: torch.device | None = None) -> dict[str, Any]:
    """Everything that determines the result of ``cfg`` on ``splits`` of ``store`` run on
    ``device`` (default: ``cfg.device`` resolved): the precision ``cfg.amp`` resolves to there
    (``auto`` is bf16 and channels_last on CUDA, float32 on the CPU) instead of ``amp``."""
    device = device if device is not None else resolve_device(cfg.device)
    autocast = autocast_dtype(cfg.amp, device)
    options = {k: v for k, v in cfg.result_options().items() if k != "amp"}
    fp: dict[str, Any] = {
        "config": options,
        "precision": {"autocast": str(autocast or torch.float32).removeprefix("torch."),
                      "channels_last": device.type == "cuda"},
        "split": {k: _indices(v) for k, v in sorted(splits.items())},
        "data": store.fingerprint,
        "code": code_version(),
        "world_size": world,
    }
    weights = cfg.encoder_weights
    if weights not in (None, "", "none", "None", "imagenet") and Path(str(weights)).is_file():
        fp["encoder_weights_sha256"] = sha256_file(str(weights))[:16]
    return json.loads(json.dumps(fp))  # as it reads back from JSON (tuples -> lists)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def decide(run_dir: Path, fingerprint: dict[str, Any], resume: bool) -> tuple[str, Any]:
    """What to do with ``run_dir``: ``("reuse", result)``, ``("resume", None)``,
    ``("fresh", note or None)`` or ``("refuse", message)``."""
    result = _read_json(run_dir / RESULT)
    if result is not None:
        changes = differences(result.get("fingerprint"), fingerprint)
        if not changes:
            return "reuse", result
        if resume:
            return "refuse", (
                f"cannot --resume {run_dir}: it finished with other inputs ({describe(changes)})"
                "; run without --resume to recompute it, or restore those inputs"
            )
        return "fresh", f"{run_dir}: recomputing, its inputs changed ({describe(changes)})"
    if (run_dir / LAST).exists():
        config = _read_json(run_dir / CONFIG)
        if not resume:
            return "fresh", (f"{run_dir}: starting over an unfinished run (--resume would "
                             "continue it)")
        if config is None:  # deleted or damaged (one without a fingerprint: differences())
            return "refuse", (
                f"cannot --resume {run_dir}: its {CONFIG} is missing or unreadable, so the "
                "inputs it was started with are unknown; run without --resume to start it over"
            )
        changes = differences(config.get("fingerprint"), fingerprint)
        if changes:
            return "refuse", (
                f"cannot --resume {run_dir}: it was started with other inputs "
                f"({describe(changes)}); run without --resume to start it over, or restore "
                "those inputs"
            )
        return "resume", None
    return "fresh", None


def _clear(run_dir: Path) -> None:
    for name in (RESULT, LAST, BEST, CONFIG, LOG, PREDICTIONS):
        (run_dir / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- checkpoints


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``, written whole or not at all (see :func:`atomic_write`).
    Serialised in memory first: torch's file writer reports a full disk as "unexpected pos",
    Python's write as the ``OSError`` it is."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode())


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it there: a process
    killed midway leaves the old file. A failed write (a full disk: ``ENOSPC``) removes the
    temporary file and raises the ``OSError`` naming ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from error
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


# ----------------------------------------------------------------------------- training


def loader(store: SliceStore, indices: np.ndarray, batch: int, *, shuffle: bool, seed: int,
           epoch: int, workers: int, d: Dist, pin: bool, no_single: bool = False) -> DataLoader:
    """A DataLoader over ``indices``; ``no_single``: drop a last batch of one sample (training
    and precise BN: BatchNorm in train mode cannot normalise one sample at the 1x1
    bottleneck). The batch order is seeded by ``(seed, epoch)``."""
    dataset = SliceDataset(store, indices)
    sampler = None
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if shuffle and d.enabled:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
    n = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        drop_last=no_single and n % batch == 1,
    )


def training_setup(cfg: RunConfig, device: torch.device):
    """Seeded model (channels-last on CUDA), loss, Adam and grad scaler for ``cfg``.

    Returns ``(model, loss_fn, optimizer, scaler, amp_dtype, channels_last)``.
    """
    amp_dtype = autocast_dtype(cfg.amp, device)
    channels_last = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.encoder, cfg.encoder_weights).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(cfg.loss).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    return model, loss_fn, optimizer, scaler, amp_dtype, channels_last


def optimizer_step(model, loss_fn, optimizer, scaler, images: torch.Tensor,
                   masks: torch.Tensor, amp_dtype: torch.dtype | None):
    """One training step: forward under autocast, the loss in full precision, scaled backward,
    optimizer step. Returns ``(logits, loss)``."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
    loss = loss_fn(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


def _is_switching(loss_fn: torch.nn.Module) -> bool:
    from dynloss import SwitchingLoss

    return isinstance(loss_fn, SwitchingLoss)


def train_run(
    cfg: RunConfig,
    store: SliceStore,
    splits: dict[str, np.ndarray],
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    keep_slices: tuple[int, ...] = (),
    progress: bool = True,
    dist_info: Dist | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] | None = print,
    before_change: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train one run and evaluate it on ``splits["test"]``; return (and save) its result.

    ``splits``: ``train``, ``val`` (may be empty: then ``cfg.monitor`` must be ``train_loss``)
    and ``test`` slice indices. A finished run whose fingerprint matches is returned without
    training; one whose fingerprint differs is recomputed (``log`` says why), or, with
    ``resume``, refused (:class:`MismatchError`). ``resume`` continues an unfinished run from
    ``last.pt``. ``stop_after``: stop after that many epochs of this call *without* finishing
    (used to test resuming). ``before_change`` is called (on the main process) before the run
    folder is written to, when the run is neither reused nor refused.
    """
    d = dist_info or Dist()
    run_dir = Path(run_dir)
    check_config(cfg, len(splits["val"]))
    device = resolve_device(cfg.device, d.local_rank)
    fingerprint = run_fingerprint(cfg, store, splits, d.world, device)
    barrier(d)
    action, detail = broadcast(d, decide(run_dir, fingerprint, resume) if d.main else None)
    if action == "refuse":
        raise MismatchError(detail)
    if action == "reuse":
        return detail
    if d.main:
        if before_change is not None:
            before_change()
        if action == "fresh":
            if detail and log is not None:
                log(detail)
            _clear(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG, json.dumps(
            {**cfg.to_dict(), "fingerprint": fingerprint}, indent=1))
    model, loss_fn, optimizer, scaler, amp_dtype, channels_last = training_setup(cfg, device)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=cfg.monitor_mode, factor=cfg.plateau_factor,
        patience=cfg.plateau_patience, threshold=cfg.plateau_threshold,
    )
    switching = _is_switching(loss_fn)
    restarts: list[int] = []
    if cfg.switch_lr == "restart":
        from dynloss import reset_plateau_scheduler

        restart = reset_plateau_scheduler(scheduler, lr=cfg.lr)
        if switching:

            def restart_at_switch(event: Any) -> None:
                restart(event)
                restarts.append(int(event.count))

            loss_fn.on_switch(restart_at_switch)

    history: list[dict[str, Any]] = []
    worst = -math.inf if cfg.monitor_mode == "max" else math.inf
    best, best_epoch, start_epoch = worst, 0, 0
    last_path = run_dir / LAST
    barrier(d)
    if action == "resume":
        state = _checkpoint(last_path, run_dir, LAST_KEYS)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if state.get("loss") is not None:
            loss_fn.load_state_dict(state["loss"])
        history = json.loads(state["history"])
        best, best_epoch = float(state["best"]), int(state["best_epoch"])
        restarts[:] = [int(e) for e in state["restarts"]]
        start_epoch = int(state["epoch"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        if d.main:
            _repair_best(run_dir, state, cfg.monitor)
    train_model: torch.nn.Module = model
    if d.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    per_rank_batch = max(1, cfg.batch_size // d.world)
    pin = device.type == "cuda"
    epochs_run = 0
    bar = tqdm(
        total=cfg.epochs, initial=start_epoch, desc=f"{run_dir.name}", unit="ep",
        disable=not (progress and d.main), leave=True,
    )
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epochs_run >= stop_after:
            bar.close()
            return {"interrupted_at_epoch": epoch}
        t0 = time.perf_counter()
        stage, active = stage_info(loss_fn)
        batches = loader(
            store, splits["train"], per_rank_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
            workers=cfg.workers, d=d, pin=pin, no_single=True,
        )
        train_model.train()
        total = torch.zeros((), device=device)
        terms: dict[str, torch.Tensor] = {}
        n_batches = 0
        for images, masks, _ in tqdm(
            batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch",
            disable=not (progress and d.main),
        ):
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            _, loss = optimizer_step(train_model, loss_fn, optimizer, scaler, images, masks,
                                     amp_dtype)
            total += loss.detach()
            for name, value in term_values(loss_fn, loss).items():
                terms[name] = terms.get(name, torch.zeros((), device=device)) + value.float()
            n_batches += 1
        train_loss = mean_across(d, total, n_batches)
        term_means = {k: mean_across(d, v, n_batches) for k, v in terms.items()}
        # ---- validation (rank 0), the same number on every rank
        metrics: dict[str, float] | None = {}
        if len(splits["val"]) and d.main:
            _precise_bn(cfg, model, store, splits["train"], device, amp_dtype, channels_last)
            counts, index, _ = predict_counts(
                model, loader(store, splits["val"], cfg.eval_batch_size, shuffle=False,
                              seed=0, epoch=0, workers=cfg.workers, d=Dist(), pin=pin),
                device=device, autocast_dtype=amp_dtype, channels_last=channels_last,
            )
            metrics = summarize(counts, store.patients[index])
        metrics = broadcast(d, metrics) or {}
        monitored = train_loss if cfg.monitor == TRAIN_LOSS else metrics[cfg.monitor]
        if math.isnan(monitored):
            monitored = -1.0 if cfg.monitor_mode == "max" else math.inf
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(monitored)
        if hasattr(loss_fn, "step"):  # the epoch's training loss feeds adaptive triggers
            loss_fn.step(metric=train_loss)
        if (cfg.switch_lr == "restart" and not switching and cfg.restart_at is not None
                and epoch + 1 == cfg.restart_at < cfg.epochs):
            restart(None)
            restarts.append(epoch + 1)
        record = {
            "epoch": epoch + 1, "stage": stage, "active": active, "lr": lr,
            "train_loss": train_loss, "terms": term_means,
            **{f"val_{k}": v for k, v in metrics.items()},
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        improved = monitored > best if cfg.monitor_mode == "max" else monitored < best
        if improved:
            best, best_epoch = monitored, epoch + 1
        if d.main:
            state = {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "loss": loss_fn.state_dict(),
                "history": json.dumps(_jsonable(history)),
                "best": best,
                "best_epoch": best_epoch,
                "restarts": list(restarts),
                "fingerprint": json.dumps(fingerprint),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }
            # last.pt first: if the process dies before best.pt is written, resuming finds
            # best_epoch == epoch in last.pt and writes best.pt from its weights
            atomic_save(state, last_path)
            if improved:
                atomic_save({"epoch": epoch + 1, "model": model.state_dict(), cfg.monitor: best},
                            run_dir / BEST)
            atomic_write_text(run_dir / LOG,
                              "".join(json.dumps(_jsonable(h)) + "\n" for h in history))
        bar.set_postfix(loss=f"{train_loss:.4f}", mon=f"{monitored:.3f}", stage=stage)
        bar.update(1)
        epochs_run += 1
    bar.close()

    result: dict[str, Any] | None = None
    if d.main:
        if not len(splits["val"]):  # no validation pass recalibrated BatchNorm: do it now
            _precise_bn(cfg, model, store, splits["train"], device, amp_dtype, channels_last)
        keep = {int(k) for k in keep_slices}
        counts, index, kept = predict_counts(
            model, loader(store, splits["test"], cfg.eval_batch_size, shuffle=False, seed=0,
                          epoch=0, workers=cfg.workers, d=Dist(), pin=pin),
            device=device, autocast_dtype=amp_dtype, channels_last=channels_last, keep=keep,
            progress=progress,
        )
        test = summarize(counts, store.patients[index])
        if kept:
            np.savez_compressed(run_dir / PREDICTIONS,
                                **{f"slice_{k}": v.astype(np.float16) for k, v in kept.items()})
        tp, fp, fn, tn = (int(v) for v in counts.sum(0))
        result = _jsonable({
            "run": str(run_dir),
            "config": cfg.to_dict(),
            "fingerprint": fingerprint,
            "test": test,
            "test_counts": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
            "best_val": best,
            "best_epoch": best_epoch,
            "monitor": cfg.monitor,
            "epochs": cfg.epochs,
            "switches": [list(s) for s in getattr(loss_fn, "switches", [])],
            "lr_restarts": list(restarts),
            "n_train": len(splits["train"]), "n_val": len(splits["val"]),
            "n_test": len(splits["test"]),
            "history": history,
            "device": str(device),
            "world_size": d.world,
        })
        atomic_write_text(run_dir / RESULT, json.dumps(result, indent=1))
    return broadcast(d, result)


LAST_KEYS = ("model", "optimizer", "scheduler", "scaler", "history", "best", "best_epoch",
             "restarts", "epoch", "rng_cpu")
"""What --resume reads from ``last.pt`` (also ``loss`` and ``rng_cuda``, where saved)."""


def _checkpoint(path: Path, run_dir: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """``path`` (a checkpoint of the run in ``run_dir``) as --resume reads it; a damaged file
    (truncated, empty) or one that lacks ``keys`` is a :class:`MismatchError` naming it and
    the way out, not torch's traceback."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}")
        missing = [key for key in keys if key not in state]
        if missing:
            raise ValueError(f"it has no {', '.join(map(repr, missing))}")
    except Exception as error:
        raise MismatchError(f"{path}: not a checkpoint of this example's runs "
                            f"({first_line(error)}); run without --resume to start {run_dir} "
                            "over") from error
    return state


def _repair_best(run_dir: Path, state: dict[str, Any], monitor: str) -> None:
    """``best.pt`` as ``last.pt`` says it is: rewritten from ``last.pt``'s weights when the
    process died between writing the two in the best epoch."""
    best_epoch = int(state["best_epoch"])
    if best_epoch == 0:
        return
    path = run_dir / BEST
    saved = _checkpoint(path, run_dir, ("epoch",)) if path.exists() else None
    if saved is not None and int(saved["epoch"]) == best_epoch:
        return
    if best_epoch != int(state["epoch"]):
        raise MismatchError(
            f"{path}: holds epoch {None if saved is None else saved['epoch']}, {LAST} says the "
            f"best epoch is {best_epoch}; run without --resume to start {run_dir} over"
        )
    atomic_save({"epoch": best_epoch, "model": state["model"], monitor: float(state["best"])},
                path)


def _precise_bn(cfg: RunConfig, model: torch.nn.Module, store: SliceStore, train: np.ndarray,
                device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> None:
    if cfg.precise_bn <= 0:
        return
    chosen = np.random.default_rng(cfg.seed).permutation(train)[: cfg.precise_bn * cfg.batch_size]
    batches = loader(store, np.sort(chosen), cfg.batch_size, shuffle=False, seed=0, epoch=0,
                     workers=cfg.workers, d=Dist(), pin=device.type == "cuda", no_single=True)
    recalibrate_bn(model, batches, device=device, autocast_dtype=amp_dtype,
                   channels_last=channels_last)
