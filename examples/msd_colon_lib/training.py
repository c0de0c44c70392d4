"""One training run: smp U-Net (EfficientNet-B0), Adam, ReduceLROnPlateau, a dynloss loss.

- The loss is built from a spec string with :func:`dynloss.build_loss` (``"iou"``,
  ``"tversky+bce"``, ``"iou->bce@50"``) and stepped once per epoch, like an LR scheduler.
  At a loss switch the plateau scheduler is reset: the loss scale jumps from ~0.3-1.0
  (region) to <0.01 (distribution), and the plateau history of the old loss means nothing.
- ReduceLROnPlateau watches the validation metric (``--monitor``, default global Dice).
- CUDA: AMP (bf16 where supported, else fp16 with a GradScaler) and channels_last.
- Seeded: model init from ``seed``; batch order from a generator seeded by (seed, epoch), so
  an interrupted run resumed from its last checkpoint reproduces the uninterrupted run.
- Checkpoints: ``last.pt`` every epoch and ``best.pt`` on a new best validation metric, both
  written atomically (temporary file + ``os.replace``) and read with ``weights_only=True``.
- ``result.json`` is written when a run finishes; a finished run is skipped next time.
- DDP under ``torchrun`` (gloo on CPU, nccl on CUDA): rank 0 evaluates, logs and saves;
  the validation metric is broadcast so every rank steps the same schedules.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import SliceDataset, SliceStore
from .evaluation import predict_counts, summarize

RESULT = "result.json"
LAST = "last.pt"
BEST = "best.pt"


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
    amp: str = "auto"
    workers: int = 0
    device: str = "auto"
    eval_batch_size: int = 64
    precise_bn: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device).type == "cuda"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank)


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def broadcast(d: Dist, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``None`` (no AMP), bfloat16 or float16; AMP is used on CUDA only."""
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise ValueError(f"amp must be auto|bf16|fp16|off, got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# ----------------------------------------------------------------------------- model


def build_model(
    encoder: str = "efficientnet-b0", encoder_weights: str | None = None
) -> torch.nn.Module:
    """smp ``Unet(encoder, in_channels=3, classes=1)``; weights ``imagenet``, ``None`` or a path.

    A path is a ``state_dict`` file of the encoder (e.g. saved from a machine with network
    access by ``torch.save(smp.Unet(..., encoder_weights="imagenet").encoder.state_dict(), p)``).
    """
    import segmentation_models_pytorch as smp

    weights = None if encoder_weights in (None, "", "none", "None") else encoder_weights
    is_path = weights is not None and weights != "imagenet"
    try:
        model = smp.Unet(
            encoder, encoder_weights=None if is_path else weights, in_channels=3, classes=1
        )
    except Exception as error:  # network errors come in many types (OSError, HTTP errors, ...)
        raise RuntimeError(
            f"could not load {weights!r} weights for {encoder} ({type(error).__name__}: {error}). "
            "Without network access, pass --encoder-weights none (train from scratch) or "
            "--encoder-weights PATH to an encoder state_dict saved where the download works."
        ) from error
    if is_path:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.encoder.load_state_dict(state)
    # smp's EfficientNet encoder keeps the classifier's head conv and BN, which the U-Net never
    # uses; freezing them changes nothing in training and lets DDP run without
    # find_unused_parameters.
    for name in ("_conv_head", "_bn1"):
        module = getattr(model.encoder, name, None)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return model


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, loader: DataLoader, *, device: torch.device,
                   autocast_dtype: torch.dtype | None, channels_last: bool) -> None:
    """"Precise BN": recompute every BatchNorm's running statistics for the current weights.

    The running averages lag behind the weights early in training (a run of a few dozen
    steps predicts garbage in eval mode). This replaces them by the exact population mean and
    variance over ``loader`` (average over batches, ``momentum=None``), with dropout and drop
    connect off. Weights, gradients, optimizer and the global RNG are untouched, so training
    itself is unchanged; only evaluation sees better statistics.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    momenta = [m.momentum for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for images, _, _ in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                model(images)
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)


# ----------------------------------------------------------------------------- losses


REGION = {"dice", "iou", "jaccard", "tversky"}
DISTRIBUTION = {"bce", "focal", "topk"}


def build_loss(spec: str) -> torch.nn.Module:
    """A dynloss loss from its spec string (``"iou"``, ``"tversky+bce"``, ``"iou->bce@50"``)."""
    import dynloss

    return dynloss.build_loss(spec)


def stage_info(loss_fn: torch.nn.Module) -> tuple[int, str]:
    """``(active stage index, repr of the active loss)``; single/composite losses: stage 0."""
    from dynloss import SwitchingLoss

    if isinstance(loss_fn, SwitchingLoss):
        return int(loss_fn.active_index), repr(loss_fn.active)
    return 0, repr(loss_fn)


def term_values(loss_fn: torch.nn.Module, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached, unweighted value of every leaf term of the loss just computed (no sync).

    ``CompositeLoss`` / ``SwitchingLoss`` expose ``last_terms`` with nested entries
    (``"compositeloss.iou"``); only the leaves are kept, named by their last component, so a
    run logs e.g. ``{"iou": ..., "bce": ...}`` whatever the nesting.
    """
    terms = getattr(loss_fn, "last_terms", None)
    if not terms:
        name = getattr(loss_fn, "name", None) or type(loss_fn).__name__.lower()
        return {str(name): value.detach()}
    keys = list(terms)
    leaves = [k for k in keys if not any(o.startswith(k + ".") for o in keys)]
    return {k.rsplit(".", 1)[-1]: terms[k].detach() for k in leaves}


# ----------------------------------------------------------------------------- checkpoints


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def load_result(run_dir: Path, config: RunConfig | None = None) -> dict | None:
    """The finished run's result, or None (also when it was run with another config)."""
    path = Path(run_dir) / RESULT
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if config is not None and result.get("config") != _jsonable(config.to_dict()):
        return None
    return result


# ----------------------------------------------------------------------------- training


def _loader(store: SliceStore, indices: np.ndarray, batch: int, *, shuffle: bool, seed: int,
            epoch: int, workers: int, d: Dist, pin: bool) -> DataLoader:
    dataset = SliceDataset(store, indices)
    sampler = None
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if shuffle and d.enabled:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed
        )
        sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=False,
        drop_last=False,
    )


def _training_setup(cfg: RunConfig, device: torch.device):
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


def _optimizer_step(model, loss_fn, optimizer, scaler, images: torch.Tensor,
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
) -> dict[str, Any]:
    """Train one run and evaluate it on ``splits["test"]``; return (and save) its result.

    ``splits``: ``train``, ``val`` and ``test`` slice indices. ``stop_after``: stop after that
    many epochs of this call *without* finishing (used to test resuming). A finished run
    (``result.json`` with the same config) is returned without training.
    """
    d = dist_info or Dist()
    run_dir = Path(run_dir)
    barrier(d)
    done = broadcast(d, load_result(run_dir, cfg) if d.main else None)
    if done is not None:
        return done
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
    device = resolve_device(cfg.device, d.local_rank)
    model, loss_fn, optimizer, scaler, amp_dtype, channels_last = _training_setup(cfg, device)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )
    _attach_plateau_reset(loss_fn, scheduler, cfg.lr)

    history: list[dict[str, Any]] = []
    best = -math.inf
    start_epoch = 0
    last_path = run_dir / LAST
    barrier(d)
    if resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if hasattr(loss_fn, "load_state_dict") and state.get("loss") is not None:
            loss_fn.load_state_dict(state["loss"])
        history = json.loads(state["history"])
        best = float(state["best"])
        start_epoch = int(state["epoch"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
    train_model = model
    if d.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    per_rank_batch = max(1, cfg.batch_size // d.world)
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
        loader = _loader(
            store, splits["train"], per_rank_batch, shuffle=True, seed=cfg.seed, epoch=epoch,
            workers=cfg.workers, d=d, pin=device.type == "cuda",
        )
        train_model.train()
        total = torch.zeros((), device=device)
        terms: dict[str, torch.Tensor] = {}
        n_batches = 0
        for images, masks, _ in tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="batch",
            disable=not (progress and d.main),
        ):
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            _, loss = _optimizer_step(train_model, loss_fn, optimizer, scaler, images, masks,
                                      amp_dtype)
            total += loss.detach()
            for name, value in term_values(loss_fn, loss).items():
                terms[name] = terms.get(name, torch.zeros((), device=device)) + value.float()
            n_batches += 1
        # ---- validation (rank 0), the same number on every rank
        metrics = None
        if d.main:
            _precise_bn(cfg, model, store, splits["train"], device, amp_dtype, channels_last)
            counts, index, _ = predict_counts(
                model, _loader(store, splits["val"], cfg.eval_batch_size, shuffle=False,
                               seed=0, epoch=0, workers=cfg.workers, d=Dist(),
                               pin=device.type == "cuda"),
                device=device, autocast_dtype=amp_dtype, channels_last=channels_last,
            )
            metrics = summarize(counts, store.patients[index])
        metrics = broadcast(d, metrics)
        train_loss = _mean_across(d, total, n_batches)
        term_means = {k: _mean_across(d, v, n_batches) for k, v in terms.items()}
        monitored = metrics[cfg.monitor]
        monitored = -1.0 if math.isnan(monitored) else monitored
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(monitored)
        if hasattr(loss_fn, "step"):  # the epoch's training loss feeds adaptive triggers
            loss_fn.step(metric=train_loss)
        record = {
            "epoch": epoch + 1, "stage": stage, "active": active, "lr": lr,
            "train_loss": train_loss, "terms": term_means,
            **{f"val_{k}": v for k, v in metrics.items()},
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        improved = monitored > best
        best = max(best, monitored)
        if d.main:
            state = {
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "loss": loss_fn.state_dict() if hasattr(loss_fn, "state_dict") else None,
                "history": json.dumps(_jsonable(history)),
                "best": best,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }
            atomic_save(state, last_path)
            if improved:
                atomic_save({"epoch": epoch + 1, "model": model.state_dict(), cfg.monitor: best},
                            run_dir / BEST)
            atomic_write_text(run_dir / "log.jsonl",
                              "".join(json.dumps(_jsonable(h)) + "\n" for h in history))
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{monitored:.3f}", stage=stage)
        bar.update(1)
        epochs_run += 1
    bar.close()

    result: dict[str, Any] | None = None
    if d.main:
        keep = {int(k) for k in keep_slices}
        counts, index, kept = predict_counts(
            model, _loader(store, splits["test"], cfg.eval_batch_size, shuffle=False, seed=0,
                           epoch=0, workers=cfg.workers, d=Dist(), pin=device.type == "cuda"),
            device=device, autocast_dtype=amp_dtype, channels_last=channels_last, keep=keep,
            progress=progress,
        )
        test = summarize(counts, store.patients[index])
        if kept:
            np.savez_compressed(run_dir / "predictions.npz",
                                **{f"slice_{k}": v.astype(np.float16) for k, v in kept.items()})
        result = _jsonable({
            "run": run_dir.name,
            "config": cfg.to_dict(),
            "test": test,
            "best_val": best,
            "epochs": cfg.epochs,
            "n_train": len(splits["train"]), "n_val": len(splits["val"]),
            "n_test": len(splits["test"]),
            "history": history,
            "device": str(device),
            "world_size": d.world,
        })
        atomic_write_text(run_dir / RESULT, json.dumps(result, indent=1))
    return broadcast(d, result)


def _precise_bn(cfg: RunConfig, model: torch.nn.Module, store: SliceStore, train: np.ndarray,
                device: torch.device, amp_dtype: torch.dtype | None, channels_last: bool) -> None:
    if cfg.precise_bn <= 0:
        return
    chosen = np.random.default_rng(cfg.seed).permutation(train)[: cfg.precise_bn * cfg.batch_size]
    loader = _loader(store, np.sort(chosen), cfg.batch_size, shuffle=False, seed=0, epoch=0,
                     workers=cfg.workers, d=Dist(), pin=device.type == "cuda")
    recalibrate_bn(model, loader, device=device, autocast_dtype=amp_dtype,
                   channels_last=channels_last)


def _mean_across(d: Dist, total: torch.Tensor, n: int) -> float:
    if d.enabled:
        buf = torch.stack([total.detach().float(), torch.tensor(float(n), device=total.device)])
        buf = buf.to("cpu") if dist.get_backend() == "gloo" else buf
        dist.all_reduce(buf)
        return float(buf[0] / max(buf[1], 1))
    return float(total) / max(n, 1)


def _attach_plateau_reset(loss_fn: torch.nn.Module, scheduler: Any, lr: float) -> None:
    """At every loss switch: forget ReduceLROnPlateau's history and restore the initial LR.

    The new loss is a new objective; its first epochs should not be judged against the old
    loss's best validation score, nor start at an LR the old loss had already decayed.
    """
    from dynloss import SwitchingLoss, reset_plateau_scheduler

    if isinstance(loss_fn, SwitchingLoss):
        loss_fn.on_switch(reset_plateau_scheduler(scheduler, lr=lr))


# ----------------------------------------------------------------------------- benchmark


def benchmark(
    cfg: RunConfig, store: SliceStore, indices: np.ndarray, *, steps: int = 30, warmup: int = 5
) -> dict[str, Any]:
    """Images/s of full training steps and the share of step time spent in the loss.

    The loss share is the time of the loss forward + backward on the step's (detached) logits,
    measured separately with device synchronisation, over the mean time of a full step
    (forward, loss, backward, optimizer) measured without intermediate synchronisation.
    """
    device = resolve_device(cfg.device)
    model, loss_fn, optimizer, scaler, amp_dtype, channels_last = _training_setup(cfg, device)
    loader = _loader(store, indices, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=0,
                     workers=cfg.workers, d=Dist(), pin=device.type == "cuda")
    batches = []
    for images, masks, _ in loader:
        if len(images) == cfg.batch_size:
            batches.append((images.to(device), masks.to(device)))
        if len(batches) == 4:
            break
    if not batches:
        raise ValueError("not enough slices for one full batch")
    if channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        return _optimizer_step(model, loss_fn, optimizer, scaler, x, y, amp_dtype)[0]

    for i in range(warmup):
        step(i)
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        logits = step(i)
    sync()
    step_s = (time.perf_counter() - t0) / steps
    leaf = logits.detach().requires_grad_(True)
    y = batches[(steps - 1) % len(batches)][1]
    for _ in range(warmup):
        loss_fn(leaf, y).backward()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        leaf.grad = None
        loss_fn(leaf, y).backward()
    sync()
    loss_s = (time.perf_counter() - t0) / steps
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "loss": cfg.loss,
        "image_size": int(store.images.shape[-1]),
        "batch_size": cfg.batch_size,
        "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "off",
        "channels_last": channels_last,
        "logits_dtype": str(logits.dtype).replace("torch.", ""),
        "steps": steps,
        "step_ms": step_s * 1e3,
        "images_per_s": cfg.batch_size / step_s,
        "loss_fwd_bwd_ms": loss_s * 1e3,
        "loss_share_of_step": loss_s / step_s,
    }


@contextlib.contextmanager
def maybe_destroy(d: Dist):
    try:
        yield
    finally:
        if d.enabled and dist.is_initialized():
            dist.destroy_process_group()
