"""Forward+backward of every loss on a GPU: dynloss against smp, MONAI, plain torch, nnU-Net.

For each shape and dtype, every implementation of every loss is measured on
``loss(x, target).backward()`` (the autograd seed is made once, outside the step):

* **eager**: wall time per step, CUDA events around each step, median of ``--reps`` after
  ``--warmup`` steps (a step that the host cannot issue fast enough shows here);
* **device**: the sum of the step's GPU activity (kernels, memsets, copies) from the
  profiler, and the number of those **launches**;
* **compiled**: the step time under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs),
  measured for as many rows as ``--compile-budget`` seconds allow (dynloss first);
* **peak extra memory**: the peak allocated during a step beyond what existed before it
  (the gradient itself is one input's size);
* the **copy fraction**: the bytes an ideal one-pass forward + one-pass backward moves (read
  input and target twice, write the gradient once) per device second, as a fraction of a
  device copy of input + target.

Implementations: ``dynloss`` (``backend="auto"``: the Triton kernels on CUDA), ``smp``
(segmentation-models-pytorch), ``monai``, ``torch`` (the loss written the obvious way in
eager PyTorch) and, for TopK, ``nnunet`` (nnU-Net's formulation: per-pixel losses, then
``torch.topk(..., sorted=False)``); their formulations are in ``peers.py``. Every row's
value and input gradient are compared with dynloss's reference before it is timed (TopK's
gradient in float32 only: in 16 bits many losses tie at its threshold, and each implementation
keeps other elements among the ties): a dynloss row that differs is an error, a peer's is
marked ``†`` in the tables. A missing
package is skipped and named. A separate table gives the **host time** per step (CPU time to
issue forward+backward, at a small shape where the GPU keeps up). The goals of the issue are
checked at the end of the report. ``--losses bce_weight_map,focal_weight_map`` (not in the
default set) times BCE and Focal under a per-pixel weight map (``reduction="none"``, each peer
its own per-element losses times the same map; torch's binary BCE by its fused ``weight=``).

Outputs under ``--out`` (default ``benchmarks/results``), named after the device:
``bench_<device>.json``, ``bench_<device>.md``, ``bench_<device>.png`` (eager) and, where
the profiler measured device time (CUDA), ``bench_<device>_device.png``. Exit status: 0
complete; 1 a dynloss row failed; 2 a usage error; 3 the eager part's ``--budget`` ran out (a
partial result).

Usage::

    PYTHONPATH=src python benchmarks/bench_cuda.py                 # GPU, every shape
    PYTHONPATH=src python benchmarks/bench_cuda.py --warm-only     # compile Triton kernels
    PYTHONPATH=src python benchmarks/bench_cuda.py --cpu-smoke     # every code path, tiny
    PYTHONPATH=src python benchmarks/bench_cuda.py --losses bce_weight_map,focal_weight_map
                                                                   # shapes, CPU interpreter
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton

import argparse
import contextlib
import json
import math
import platform
import random
import re
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import dynloss

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peers.py, however it is loaded
from peers import WEIGHT_MAPS, _dynloss, implementation  # the peers' formulations

SHAPES = {
    "full": [
        ("binary", (32, 1, 256, 256)),
        ("multiclass", (8, 4, 256, 256)),
        ("binary", (2, 1, 128, 128, 128)),
        ("binary", (32, 1, 1024, 1024)),  # 33.5M elements
    ],
    "small": [("binary", (4, 1, 32, 32)), ("multiclass", (2, 4, 16, 16))],
    "smoke": [("binary", (2, 1, 8, 8)), ("multiclass", (2, 3, 6, 5))],
}
HOST_SHAPE = {"binary": (2, 1, 64, 64), "multiclass": (2, 4, 32, 32)}
LOSSES = ["dice", "iou", "tversky", "bce", "focal", "topk", "dice+bce", "dice+focal"]
EXTRA_LOSSES = list(WEIGHT_MAPS)
"""Timed only when named (``--losses bce_weight_map,focal_weight_map``): BCE and Focal under a
per-pixel weight map (``reduction="none"``; see ``peers.py``)."""
IMPLS = ["dynloss", "smp", "monai", "torch", "nnunet"]
GOAL_SHAPE = (32, 1, 256, 256)
ROUNDS = 5
"""Rounds of the eager timing: each times a block of ``--reps / ROUNDS`` steps of every
implementation, in a new random order."""
GOAL_SPEEDUP = 5.0
GOAL_COPY = 0.5
GOAL_LARGE = 32 * 2**20


@dataclass
class Row:
    shape: list[int]
    mode: str
    dtype: str
    loss: str
    impl: str
    ms: float | None = None
    ms_p20: float | None = None
    ms_p80: float | None = None
    device_ms: float | None = None
    launches: float | None = None
    compiled_ms: float | None = None
    compile_note: str | None = None
    peak_extra_mb: float | None = None
    peak_extra_x_input: float | None = None
    ideal_bytes: int | None = None
    copy_fraction: float | None = None
    max_abs_diff_vs_reference: float | None = None
    max_rel_grad_diff_vs_reference: float | None = None
    """The largest difference of the input's gradient from the reference's, as a fraction of
    the reference gradient's largest element."""
    error: str | None = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------ implementations


VENDOR = Path(__file__).resolve().parent / ".vendor"
"""Copies of smp's losses and MONAI made by ``vendor_competitors.sh`` (used when not installed)."""


def _vendored_versions() -> dict[str, str]:
    try:
        lines = (VENDOR / "VERSIONS").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(" ", 1) for line in lines if " " in line)


def _optional(name: str):
    """The module, or a string saying why it is unavailable (falls back to the copies in
    ``benchmarks/.vendor``; installed packages win)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return __import__(name)
    except Exception as exc:  # missing, or broken install
        reason = f"{type(exc).__name__}: {exc}"
    if not VENDOR.is_dir():
        return reason
    if str(VENDOR) not in sys.path:
        sys.path.append(str(VENDOR))
    version = _vendored_versions()
    try:
        if name == "segmentation_models_pytorch":
            import types

            losses = __import__("smp_losses")
            return types.SimpleNamespace(
                losses=losses, __version__=version.get("smp", "?") + " (vendored losses)")
        module = __import__(name)
        module.__version__ = f"{getattr(module, '__version__', '?')} (vendored)"
        return module
    except Exception as exc:
        return f"{reason}; vendored copy failed too: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------- timing


class Device:
    """Timing, profiling and memory on one device (CUDA, or the CPU for the smoke run)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def times(self, step: Callable[[], None], warmup: int, reps: int) -> list[float]:
        for _ in range(warmup):
            step()
        self.sync()
        if not self.cuda:
            out = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                out.append((time.perf_counter() - t0) * 1e3)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        self.sync()
        return [s.elapsed_time(e) for s, e in events]

    def profile(self, step: Callable[[], None], steps: int = 3) -> tuple[float, float] | None:
        """``(device ms, launches)`` per step from the profiler (CUDA only)."""
        if not self.cuda:
            return None
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        step()
        self.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            self.sync()
        device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        total_us = sum(e.time_range.elapsed_us() for e in device_events)
        return total_us / steps / 1e3, len(device_events) / steps

    def peak_extra(self, step: Callable[[], None]) -> int | None:
        if not self.cuda:
            return None
        reset = getattr(step, "reset", None)
        if reset is not None:  # the last step's gradient is not part of the baseline
            reset()
        self.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        step()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - base


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def make_step(fn: Callable, x: torch.Tensor, t: torch.Tensor) -> Callable[[], None]:
    """One forward+backward; the seed of the backward pass is made once."""
    xg = x.detach().clone().requires_grad_(True)
    seeds: dict[torch.dtype, torch.Tensor] = {}

    def step() -> None:
        xg.grad = None
        loss = fn(xg, t)
        seed = seeds.get(loss.dtype)
        if seed is None:  # first step only: later steps launch nothing for it
            seed = seeds[loss.dtype] = torch.ones((), device=x.device, dtype=loss.dtype)
        loss.backward(seed)

    def reset() -> None:
        xg.grad = None

    step.reset = reset  # type: ignore[attr-defined]
    return step


def value_and_grad(fn: Callable, x: torch.Tensor, t: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(x, t)`` in float32 and its gradient for ``x`` (the target needs none)."""
    xg = x.detach().requires_grad_(True)
    value = fn(xg, t)
    (grad,) = torch.autograd.grad(value, xg)
    return value.detach().float(), grad


def compares_gradient(loss: str, dtype: str) -> bool:
    """Whether the rows' gradients of ``loss`` in ``dtype`` are compared with the reference's:
    not TopK's in 16 bits, where many per-pixel losses tie at the selection threshold and each
    implementation keeps other elements among the ties (the same value, another gradient)."""
    return dtype == "float32" or "topk" not in loss.split("+")


def relative_difference(grad: torch.Tensor, want: torch.Tensor) -> float:
    """``max |grad - want| / max |want|`` in float32 (0 where both are zero)."""
    scale = float(want.float().abs().max())
    diff = float((grad.float() - want.float()).abs().max())
    return diff / scale if scale > 0 else diff


def make_inputs(mode: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(shape, generator=gen, device=device) * 2).to(dtype)
    if mode == "multiclass":
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen, device=device)
    else:
        t = (torch.rand(shape, generator=gen, device=device) > 0.9).to(dtype)
    return x, t


def copy_ms(nbytes: int, dev: Device, warmup: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev.device)
    dst = torch.empty_like(src)
    return statistics.median(dev.times(lambda: dst.copy_(src), warmup, reps))


def count_interpreted_launches(step: Callable[[], None]) -> int:
    """Launches of one step under Triton's interpreter: Triton kernels plus aten operations
    that launch work (as ``tests/_launches.py`` counts them; the CPU smoke run)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dynloss.kernels.triton import stream

    launches: list[str] = []
    paused = [0]

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if not paused[0] and not func.is_view and not name.startswith("empty") and (
                    name not in ("new_empty", "new_empty_strided")):
                launches.append(name)
            return func(*args, **(kwargs or {}))

    kernel_class = type(stream._binary_fwd_kernel)
    original = kernel_class.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        paused[0] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            paused[0] -= 1

    kernel_class.run = run
    try:
        with Counter():
            step()
    finally:
        kernel_class.run = original
    return len(launches)


def host_us(step: Callable[[], None], dev: Device, n: int) -> float:
    """CPU time to issue one step (the GPU keeps up at the small host-table shape)."""
    for _ in range(5 if dev.cuda else 1):
        step()
    dev.sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    elapsed = time.perf_counter() - t0
    dev.sync()
    return elapsed / n * 1e6


# ------------------------------------------------------------------------------------ report


def versions(mods: dict) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "dynloss": dynloss.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        out["triton"] = triton.__version__
    except Exception as exc:
        out["triton"] = f"unavailable ({type(exc).__name__})"
    for name, mod in mods.items():
        out[name] = getattr(mod, "__version__", "?") if not isinstance(mod, str) else (
            f"not installed ({mod})")
    return out


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


def _best_competitor(by: dict[str, Row], names=("smp", "monai")) -> Row | None:
    rows = [by[i] for i in names if i in by and by[i].ms is not None]
    return min(rows, key=lambda r: r.ms) if rows else None  # type: ignore[arg-type,return-value]


def goals(rows: list[Row]) -> list[str]:
    """The issue's measured goals, row by row: met / not met / not measured."""
    groups: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        groups.setdefault((tuple(r.shape), r.mode, r.dtype, r.loss), {})[r.impl] = r
    lines = []
    faster, speedup, copy = [], [], []
    for (shape, mode, dtype, loss), by in groups.items():
        ours = by.get("dynloss")
        label = f"{loss} {mode} {shape} {dtype}"
        if ours is None or ours.ms is None:
            faster.append(f"- not measured: {label} (dynloss {ours.error if ours else 'missing'})")
            continue
        slower = [i for i, r in by.items() if i != "dynloss" and r.ms is not None
                  and r.ms <= ours.ms]
        faster.append(f"- {'MET' if not slower else 'NOT MET'}: {label}: dynloss "
                      f"{ours.ms:.3f} ms" + (f"; as fast or faster: {', '.join(slower)}"
                                             if slower else ""))
        best = _best_competitor(by)
        if shape == GOAL_SHAPE and best is not None:
            ratio = best.ms / ours.ms  # type: ignore[operator]
            speedup.append(f"- {'MET' if ratio >= GOAL_SPEEDUP else 'NOT MET'}: {label}: "
                           f"{ratio:.1f}x the faster of smp/MONAI ({best.impl} {best.ms:.3f} ms)")
        if math.prod(shape) >= GOAL_LARGE:
            frac = ours.copy_fraction
            verdict = ("not measured" if frac is None else "MET" if frac >= GOAL_COPY
                       else "NOT MET")
            copy.append(f"- {verdict}: {label}: device time at "
                        f"{_fmt(frac and 100 * frac, '.0f')} % of copy bandwidth")
    lines += ["### dynloss faster than smp, MONAI, plain torch (and nnU-Net) at every shape", "",
              *faster, "", f"### >= {GOAL_SPEEDUP:.0f}x the faster of smp and MONAI at "
              f"{GOAL_SHAPE} (eager)", "", *(speedup or ["- not measured"]), "",
              f"### device time >= {GOAL_COPY:.0%} of copy bandwidth at >= 32M elements", "",
              *(copy or ["- not measured"])]
    return lines


def _table(lines: list[str], present: list[str], by_loss: dict[str, dict[str, Row]],
           title: str, extra: list[str], cell: Callable[[Row], str],
           extra_cells: Callable[[dict[str, Row]], list[str]]) -> None:
    lines.extend([f"{title}:", "", "| " + " | ".join(["loss", *present, *extra]) + " |",
                  "|" + "---|" * (1 + len(present) + len(extra))])
    for loss, by in by_loss.items():
        cells = [loss] + ["–" if by.get(i) is None else cell(by[i]) for i in present]
        lines.append("| " + " | ".join(cells + extra_cells(by)) + " |")
    lines.append("")


def _eager_extra(by: dict[str, Row]) -> list[str]:
    ours, best = by.get("dynloss"), _best_competitor(by)
    return [f"{best.ms / ours.ms:.1f}x" if ours and ours.ms and best and best.ms else "–",
            _fmt(ours.peak_extra_x_input, ".2f") if ours else "–",
            f"{ours.copy_fraction:.0%}" if ours and ours.copy_fraction else "–"]


def _tolerance(dtype: str) -> float:
    """How far a value, or a gradient relative to its largest element, may move by rounding."""
    return 1e-4 if dtype == "float32" else 2e-2


def _value_differs(row: Row) -> bool:
    return (row.max_abs_diff_vs_reference or 0.0) > _tolerance(row.dtype)


def _gradient_differs(row: Row) -> bool:
    return (row.max_rel_grad_diff_vs_reference or 0.0) > _tolerance(row.dtype)


def differs(row: Row) -> bool:
    """A peer's value or input gradient differs from dynloss's reference beyond its dtype's
    rounding: it computes another loss (nnU-Net's TopK keeps ``int(k * n)`` elements, dynloss
    ``ceil``), marked in the tables (a dynloss row that differs is an error)."""
    return row.impl != "dynloss" and (_value_differs(row) or _gradient_differs(row))


def _difference(row: Row) -> str:
    """The footnote of a row that :func:`differs`: what differs, and by how much."""
    value = f"{row.max_abs_diff_vs_reference:.3g}"
    gradient = f"{row.max_rel_grad_diff_vs_reference:.3g} of its largest element"
    if _value_differs(row) and _gradient_differs(row):
        said = f"its value differs from dynloss's reference by {value} and its gradient by " \
               f"{gradient}"
    elif _value_differs(row):
        said = f"its value differs from dynloss's reference by {value}"
    else:
        said = f"its gradient differs from dynloss's reference by {gradient}"
    return f"† {row.impl} {row.loss}: {said} (another loss)"


def _eager_cell(row: Row) -> str:
    return "error" if row.error else _fmt(row.ms) + ("†" if differs(row) else "")


def markdown(meta: dict, rows: list[Row]) -> str:
    lines = [f"# dynloss benchmark on {meta['device']}", ""]
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    lines += ["", meta["description"], ""]
    for note in meta["notes"]:
        lines.append(f"- {note}")
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((tuple(r.shape), r.mode, r.dtype), []).append(r)
    for (shape, mode, dtype), grp in groups.items():
        copy = meta["copy"].get(f"{list(shape)}|{dtype}")
        lines += ["", f"## {mode} {tuple(shape)} {dtype}"
                  + (f" (copy of input+target: {copy['ms']:.3f} ms, {copy['gbs']:.0f} GB/s)"
                     if copy else ""), ""]
        present = [i for i in IMPLS if any(r.impl == i for r in grp)]
        table_losses = list(dict.fromkeys(r.loss for r in grp))
        by_loss = {loss: {r.impl: r for r in grp if r.loss == loss} for loss in table_losses}
        _table(lines, present, by_loss, "Eager forward+backward, ms",
               ["dynloss vs faster of smp/MONAI", "dynloss peak extra (x input)",
                "dynloss device BW / copy"],
               _eager_cell, _eager_extra)
        lines += [_difference(r) for r in grp if differs(r) and not r.error]
        if any(differs(r) and not r.error for r in grp):
            lines.append("")
        _table(lines, present, by_loss, "Device time per step, ms / launches", [],
               lambda r: ("error" if r.error else
                          f"{_fmt(r.device_ms)} / {_fmt(r.launches, '.0f')}"), lambda by: [])
        _table(lines, present, by_loss, "torch.compile(mode='reduce-overhead'), ms", [],
               lambda r: _fmt(r.compiled_ms) if r.compiled_ms else (r.compile_note or "–"),
               lambda by: [])
    if meta.get("host"):
        lines += ["", "## Host time per forward+backward (µs of CPU to issue one step)", "",
                  "| loss | mode | " + " | ".join(IMPLS) + " |",
                  "|" + "---|" * (len(IMPLS) + 2)]
        for entry in meta["host"]:
            lines.append(f"| {entry['loss']} | {entry['mode']} | " + " | ".join(
                _fmt(entry.get(i), ".0f") for i in IMPLS) + " |")
    lines += ["", "## Goals (issue #12)", "", *goals(rows)]
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            lines.append(f"- {r.mode} {tuple(r.shape)} {r.dtype} {r.loss} {r.impl}: {r.error}")
    return "\n".join(lines) + "\n"


def plot(out: Path, slug: str, meta: dict, rows: list[Row]) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot: matplotlib unavailable ({type(exc).__name__})"
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.ms is not None:
            groups.setdefault((tuple(r.shape), r.mode, r.dtype), []).append(r)
    if not groups:
        return "no plot: no measurements"
    figures = [("", "ms", "eager fwd+bwd ms")]
    if any(r.device_ms is not None for r in rows):  # (only the profiler on CUDA measures it)
        figures.append(("_device", "device_ms", "device ms per fwd+bwd"))
    for suffix, attr, label in figures:
        fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.2 * len(groups)),
                                 squeeze=False)
        for ax, ((shape, mode, dtype), grp) in zip(axes[:, 0], groups.items(), strict=False):
            losses = list(dict.fromkeys(r.loss for r in grp))
            present = [i for i in IMPLS if any(r.impl == i for r in grp)]
            width = 0.8 / max(1, len(present))
            for j, impl in enumerate(present):
                vals = [next((getattr(r, attr) for r in grp if r.loss == loss
                              and r.impl == impl), None) or 0.0 for loss in losses]
                ax.bar([i + j * width for i in range(len(losses))], vals, width, label=impl)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(losses))], losses)
            ax.set_yscale("log")
            ax.set_ylabel(label)
            ax.set_title(f"{mode} {shape} {dtype} on {meta['device']} "
                         f"(torch {meta['versions']['torch']}, triton "
                         f"{meta['versions']['triton']})", fontsize=9)
            ax.legend(fontsize=7, ncol=len(present))
        fig.tight_layout()
        fig.savefig(out / f"bench_{slug}{suffix}.png", dpi=100)
        plt.close(fig)
    return None


# -------------------------------------------------------------------------------------- main


def warm(device: torch.device, dtypes: list[torch.dtype], shapes: list) -> int:
    """Compile every Triton kernel the benchmark launches (on inputs of batch <= 2: the
    kernels are specialised on argument properties, not on sizes); run it in parallel with
    other work to keep compilation out of the timed benchmark."""
    started = time.monotonic()
    failures = 0
    for dtype in dtypes:
        for mode, shape in shapes:
            x, t = make_inputs(mode, (min(shape[0], 2), *shape[1:]), dtype, device)
            for loss in LOSSES + EXTRA_LOSSES:
                try:
                    make_step(_dynloss(loss, mode, "triton"), x, t)()
                except Exception as exc:
                    failures += 1
                    print(f"warm {mode} {shape} {dtype} {loss}: {type(exc).__name__}: {exc}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"warmed the Triton kernels in {time.monotonic() - started:.0f} s, {failures} failures")
    return 1 if failures else 0


def device_label(cuda_name: str | None, cpu_smoke: bool, machine: str) -> str:
    """What ran, as the result files name it: the GPU's name; on the CPU, the smoke run's
    Triton interpreter or dynloss's default backend (the native kernels)."""
    if cuda_name is not None:
        return cuda_name
    return f"cpu-smoke ({machine}, Triton interpreter)" if cpu_smoke else (
        f"cpu ({machine}, backend auto)")


def _check_names(parser: argparse.ArgumentParser, option: str, given: str,
                 known: list[str]) -> None:
    """Each comma-separated name of ``given`` is one of ``known``, else a usage error."""
    for name in (part for part in given.split(",") if part):
        if name not in known:
            parser.error(f"{option}: unknown {name!r} (one of {', '.join(known)})")


SMOKE = {"device": "cpu", "shapes": "smoke", "reps": 2, "warmup": 1}
"""What ``--cpu-smoke`` runs."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="full")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--losses", default=",".join(LOSSES))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--host-losses", default="dice,focal,topk,dice+bce",
                        help="losses of the host-time table")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=200.0,
                        help="seconds for the eager measurements")
    parser.add_argument("--compile-budget", type=float, default=90.0,
                        help="seconds for the torch.compile(mode='reduce-overhead') column")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--warm-only", action="store_true",
                        help="only compile the Triton kernels of every configuration")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="every code path on tiny shapes on the CPU (Triton's interpreter;"
                             " no timing worth reading), results to a temporary folder")
    args = parser.parse_args()
    _check_names(parser, "--losses", args.losses, LOSSES + EXTRA_LOSSES)
    _check_names(parser, "--host-losses", args.host_losses, LOSSES + EXTRA_LOSSES)
    _check_names(parser, "--impls", args.impls, IMPLS)
    for name in (part for part in args.dtypes.split(",") if part):
        if not isinstance(getattr(torch, name, None), torch.dtype):
            parser.error(f"--dtypes: unknown {name!r} (torch dtype names: float32, bfloat16, "
                         "float16)")
    started = time.monotonic()
    backend = "auto"
    if args.cpu_smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) != parser.get_default(key):
                parser.error("--cpu-smoke runs " + " ".join(
                    f"--{k} {v}" for k, v in SMOKE.items()) + f": not with --{key}")
            setattr(args, key, value)
        args.compile_budget = min(args.compile_budget, 60.0)
        if args.dtypes == parser.get_default("dtypes"):
            args.dtypes = "float32"
        if args.host_losses == parser.get_default("host_losses"):
            args.host_losses = "dice"
        backend = "triton"
        if args.out == parser.get_default("out"):
            import tempfile

            args.out = tempfile.mkdtemp(prefix="dynloss_bench_smoke_")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; nothing to benchmark (use --cpu-smoke)")
        return 1
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    losses = [loss for loss in args.losses.split(",") if loss]
    if args.warm_only:
        return warm(device, dtypes, SHAPES[args.shapes])
    dev = Device(device)
    device_name = device_label(torch.cuda.get_device_name(device) if dev.cuda else None,
                               args.cpu_smoke, platform.machine())
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    smp = _optional("segmentation_models_pytorch")
    monai = _optional("monai")
    monai_losses = None
    if not isinstance(monai, str):
        try:
            import monai.losses as monai_losses
        except Exception as exc:
            monai = f"{type(exc).__name__}: {exc}"
    notes: list[str] = []
    for name, mod in (("smp", smp), ("monai", monai)):
        if isinstance(mod, str):
            notes.append(f"{name} skipped: not importable ({mod})")
    if args.cpu_smoke:
        notes.append("CPU smoke run: tiny shapes in Triton's interpreter; the times say "
                     "nothing about GPU speed, the launch counts include the CPU-only host "
                     "check of multiclass labels (3 operations)")
    impls = [i for i in args.impls.split(",") if i]
    meta = {
        "device": device_name,
        "versions": versions({"smp": smp, "monai": monai}),
        "settings": {"reps": args.reps, "warmup": args.warmup, "budget_s": args.budget,
                     "compile_budget_s": args.compile_budget},
        "description": (
            f"Forward+backward per step: eager wall time (median of {ROUNDS} rounds of "
            f"{max(1, math.ceil(args.reps / ROUNDS))} steps after {args.warmup} warm-up, every "
            "implementation in a new random order each round; CUDA events), device time "
            "and launches per step (the profiler's GPU activity: kernels, memsets, copies), "
            "the step under "
            "torch.compile(mode='reduce-overhead'), peak memory allocated beyond the inputs "
            "in multiples of the input's size (the gradient itself is 1.0), and the ideal "
            "traffic (read input+target twice, write the gradient once) per device second as "
            "a fraction of a device copy of input+target. dynloss runs with backend='auto' "
            "(the Triton kernels on CUDA) and check_values=False (its CUDA default); every "
            "row's value and input gradient are compared with dynloss's reference (a dynloss "
            "row that differs is an error; MONAI's multiclass Focal, a mean over the classes "
            "too, is times C)."),
        "notes": notes,
        "copy": {},
        "host": [],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv,
    }
    for note in notes:
        print("NOTE:", note, flush=True)
    rows: list[Row] = []
    rng = random.Random(0)  # the order of the implementations in each timing round

    def write() -> None:
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        (out / f"bench_{slug}.json").write_text(json.dumps(
            {"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
        (out / f"bench_{slug}.md").write_text(markdown(meta, rows))

    fns: dict[tuple, Callable] = {}
    inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    over_budget = False
    # -------------------------------------------------------------- eager, device, memory
    for dtype in dtypes:
        for mode, shape in SHAPES[args.shapes]:
            dname = str(dtype).replace("torch.", "")
            if time.monotonic() - started > args.budget:
                over_budget = True
                break
            try:
                x, t = make_inputs(mode, shape, dtype, device)
            except Exception as exc:  # e.g. out of memory
                rows.append(Row(list(shape), mode, dname, "*", "*",
                                error=f"inputs: {type(exc).__name__}: {exc}"))
                continue
            x_bytes = x.numel() * x.element_size()
            t_bytes = t.numel() * t.element_size()
            ideal = 2 * (x_bytes + t_bytes) + x_bytes
            copy_bw = None
            try:
                ms = copy_ms(x_bytes + t_bytes, dev, args.warmup, max(args.reps, 10))
                copy_bw = 2 * (x_bytes + t_bytes) / (ms * 1e-3) / 1e9
                meta["copy"][f"{list(shape)}|{dname}"] = {"ms": ms, "gbs": copy_bw,
                                                         "bytes": x_bytes + t_bytes}
            except Exception as exc:
                notes.append(f"copy {shape} {dname}: {type(exc).__name__}: {exc}")
            for loss in losses:
                if time.monotonic() - started > args.budget:
                    over_budget = True
                    break
                want: torch.Tensor | None = None
                want_grad: torch.Tensor | None = None
                try:
                    want, want_grad = value_and_grad(_dynloss(loss, mode, "reference"), x, t)
                except Exception as exc:  # e.g. out of memory: the rows say it, unchecked
                    want = want_grad = None
                    notes.append(f"reference {loss} {mode} {shape} {dname}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                steps: dict[str, tuple[Row, Callable[[], None]]] = {}
                made: list[Row] = []
                for impl in impls:
                    row = Row(list(shape), mode, dname, loss, impl, ideal_bytes=ideal)
                    try:
                        fn = implementation(impl, loss, mode, smp, monai_losses, backend)
                        if fn is None:
                            continue  # no such loss in that library
                        if want is not None and want_grad is not None:
                            # every row's value and input gradient against the reference's
                            value, grad = value_and_grad(fn, x, t)
                            row.max_abs_diff_vs_reference = float((value - want).abs().max())
                            if compares_gradient(loss, dname):
                                row.max_rel_grad_diff_vs_reference = relative_difference(
                                    grad, want_grad)
                            del grad
                            if impl == "dynloss" and not torch.allclose(
                                    value, want, rtol=1e-4, atol=1e-5):
                                raise ValueError(f"its value differs from the reference's by "
                                                 f"{row.max_abs_diff_vs_reference:.3g}")
                            if impl == "dynloss" and _gradient_differs(row):
                                raise ValueError(
                                    "its gradient differs from the reference's by "
                                    f"{row.max_rel_grad_diff_vs_reference:.3g} (a fraction "
                                    "of the largest element)")
                        step = make_step(fn, x, t)
                        step()  # compile / warm caches
                        peak = dev.peak_extra(step)
                        if peak is not None:
                            row.peak_extra_mb = peak / 2**20
                            row.peak_extra_x_input = peak / x_bytes
                        profiled = dev.profile(step)
                        if profiled is not None:
                            row.device_ms, row.launches = profiled
                            if copy_bw and row.device_ms:
                                row.copy_fraction = ideal / (row.device_ms * 1e-3) / 1e9 / copy_bw
                        elif args.cpu_smoke and impl == "dynloss":
                            row.launches = count_interpreted_launches(step)
                        dev.times(step, args.warmup, 0)  # its warm-up before the rounds
                        steps[impl] = (row, step)
                        fns[(tuple(shape), dname, loss, impl)] = fn
                    except Exception as exc:
                        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                        if impl == "dynloss":
                            row.extra["traceback"] = traceback.format_exc()[-3000:]
                    rows.append(row)
                    made.append(row)
                # timed side by side: ROUNDS rounds, each a block of reps of every
                # implementation in a new random order (drift of clocks, temperature or the
                # allocator then falls on all of them alike)
                times: dict[str, list[float]] = {impl: [] for impl in steps}
                block = max(1, math.ceil(args.reps / ROUNDS))
                for _ in range(ROUNDS):
                    for impl in rng.sample(list(steps), len(steps)):
                        try:
                            times[impl] += dev.times(steps[impl][1], 0, block)
                        except Exception as exc:
                            steps[impl][0].error = f"{type(exc).__name__}: {exc}"[:300]
                for impl, (row, _step) in steps.items():
                    if row.error:
                        continue
                    row.ms = statistics.median(times[impl])
                    row.ms_p20, row.ms_p80 = (_quantile(times[impl], 0.2),
                                              _quantile(times[impl], 0.8))
                for row in made:
                    status = row.error or (
                        f"{row.ms:8.3f} ms  device {_fmt(row.device_ms)} ms  launches "
                        f"{_fmt(row.launches, '.0f')}  peak+{row.peak_extra_x_input or 0:5.2f}x "
                        f" {(row.copy_fraction or 0):5.0%} of copy  "
                        f"diff {row.max_abs_diff_vs_reference} "
                        f"grad {row.max_rel_grad_diff_vs_reference}")
                    print(f"{mode:10s} {shape!s:22s} {dname:9s} {loss:11s} {row.impl:8s} "
                          f"{status}", flush=True)
                if over_budget:
                    break
            inputs[(tuple(shape), dname)] = (x, t)
            want = want_grad = None  # (not kept into the next shape's measurements)
            del x, t
            if dev.cuda:
                torch.cuda.empty_cache()
            write()
            if over_budget:
                break
        if over_budget:
            break
    notes_budget = (f"eager part stopped early: its budget of {args.budget:.0f} s was spent; "
                    "later shapes/dtypes are missing")
    if over_budget:
        notes.append(notes_budget)
        print("NOTE:", notes[-1], flush=True)

    # ----------------------------------------------------------------- host time per step
    for mode in ("binary", "multiclass"):
        x, t = make_inputs(mode, HOST_SHAPE[mode] if dev.cuda else SHAPES["smoke"][
            mode == "multiclass"][1], dtypes[0], device)
        for loss in [name for name in args.host_losses.split(",") if name]:
            entry: dict = {"loss": loss, "mode": mode}
            for impl in impls:
                try:
                    fn = implementation(impl, loss, mode, smp, monai_losses, backend)
                    if fn is not None:
                        entry[impl] = host_us(make_step(fn, x, t), dev, 200 if dev.cuda else 3)
                except Exception as exc:
                    notes.append(f"host time {loss} {mode} {impl}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200]}")
            meta["host"].append(entry)
            print("host µs", entry, flush=True)
    write()

    # ------------------------------------------------- torch.compile(mode="reduce-overhead")
    compile_started = time.monotonic()
    priority = {"dynloss": 0, "torch": 1, "smp": 2, "monai": 3, "nnunet": 4}
    order = sorted(rows, key=lambda r: (tuple(r.shape) != GOAL_SHAPE, r.dtype != "float32",
                                        r.impl != "dynloss", priority.get(r.impl, 9)))
    for row in order:
        key = (tuple(row.shape), row.dtype, row.loss, row.impl)
        if row.ms is None or key not in fns:
            continue
        x, t = inputs[(tuple(row.shape), row.dtype)]
        if time.monotonic() - compile_started > args.compile_budget:
            row.compile_note = "not measured (budget)"
            continue
        try:
            torch._dynamo.reset()
            options = ({"mode": "reduce-overhead"} if dev.cuda else {"backend": "aot_eager"})
            compiled = torch.compile(fns[key], fullgraph=row.impl == "dynloss", **options)
            inner = make_step(compiled, x, t)

            def step(inner=inner) -> None:
                if dev.cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                inner()

            for _ in range(3):  # compile, cudagraph warm-up and recording
                step()
            row.compiled_ms = statistics.median(dev.times(step, args.warmup, args.reps))
        except Exception as exc:
            row.compile_note = f"error: {type(exc).__name__}"
            row.extra["compile_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        print(f"compiled {row.mode:10s} {row.shape!s:22s} {row.dtype:9s} {row.loss:11s} "
              f"{row.impl:8s} {_fmt(row.compiled_ms)} ms {row.compile_note or ''}", flush=True)
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    write()
    msg = plot(out, slug, meta, rows)
    if msg:
        notes.append(msg)
        write()
    print(f"wrote {out}/bench_{slug}.{{json,md,png}} in {time.monotonic() - started:.0f} s")
    failed = [r for r in rows if r.impl == "dynloss" and r.error]
    if failed:  # a partial result must not pass for a complete one
        print(f"benchmark: {len(failed)} dynloss rows failed (see the Errors section)",
              file=sys.stderr)
        return 1
    if over_budget:  # (nor one its budget cut short: exit status 3)
        print(f"benchmark: incomplete: {notes_budget}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
