"""``--benchmark``: images/s of full training steps and the share of step time in the loss."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import SliceStore
from .distributed import Dist, broadcast, resolve_device
from .errors import OptionsError
from .options import BENCHMARK_LOSSES
from .training import RunConfig, loader, optimizer_step, training_setup


def benchmark(
    cfg: RunConfig, store: SliceStore, indices: np.ndarray, *, steps: int = 30, warmup: int = 5,
    local_rank: int = 0,
) -> dict[str, Any]:
    """Images/s of full training steps and the share of step time spent in the loss.

    The loss share is the time of the loss forward + backward on the step's (detached) logits,
    measured separately with device synchronisation, over the mean time of a full step
    (forward, loss, backward, optimizer) measured without intermediate synchronisation.
    """
    device = resolve_device(cfg.device, local_rank)  # under torchrun: this rank's GPU
    model, loss_fn, optimizer, scaler, amp_dtype, channels_last = training_setup(cfg, device)
    source = loader(store, indices, cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=0,
                    workers=cfg.workers, d=Dist(), pin=device.type == "cuda")
    batches = []
    for images, masks, _ in source:
        if len(images) == cfg.batch_size:
            batches.append((images.to(device), masks.to(device)))
        if len(batches) == 4:
            break
    if not batches:
        raise OptionsError(f"--benchmark: fewer than --batch-size {cfg.batch_size} slices")
    if channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)]
        return optimizer_step(model, loss_fn, optimizer, scaler, x, y, amp_dtype)[0]

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


def run_benchmark(args: Any, store: SliceStore, out: Path, d: Dist, synthetic: bool
                  ) -> dict[str, Any]:
    """Time training steps for every ``--loss`` (default: ``iou``, ``bce``, ``iou+bce``);
    write ``benchmark.json`` and ``benchmark.md``."""
    data = "synthetic phantom" if synthetic else "Task10_Colon"
    rows = []
    for spec in args.loss or BENCHMARK_LOSSES:
        cfg = RunConfig(loss=spec, epochs=1, batch_size=args.batch_size, lr=args.lr,
                        encoder_weights=args.encoder_weights, amp=args.amp, workers=args.workers,
                        device=args.device)
        row = benchmark(cfg, store, np.arange(len(store)), steps=args.benchmark_steps,
                        local_rank=d.local_rank)
        rows.append({**row, "data": data})
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
            f"# examples/msd_colon.py --benchmark ({data})\n\n"
            "Full training step (U-Net EfficientNet-B0 forward, loss, backward, Adam) timed "
            "without intermediate syncs; loss share = loss forward+backward on the step's "
            "detached logits, timed separately, over the step time.\n\n" + head + body
        )
        print(head + body, flush=True)
    return broadcast(d, {"rows": rows})
