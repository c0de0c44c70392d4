"""Forward+backward time and peak memory of every loss and fused composite on a GPU.

For each shape and dtype this times ``loss(x, target).backward()`` for dynloss (each
backend: ``triton``, ``torch``, ``reference``), segmentation-models-pytorch, MONAI and plain
eager PyTorch, with CUDA events around every iteration (the median of ``--reps`` is reported,
after ``--warmup`` untimed iterations), and the peak memory allocated beyond the inputs. It
also times a device copy of the bytes of input + target and reports, for each row, the
achieved bandwidth of an ideal one-pass forward + one-pass backward (read input and target
twice, write the gradient once) as a fraction of the copy bandwidth. Packages that are not
installed are skipped and named in the output. Each measurement is guarded: a failure is
recorded in its row and the run goes on; ``--budget`` seconds bound the whole run.

Outputs under ``--out`` (default ``benchmarks/results``): ``bench_<device>.json``,
``bench_<device>.md`` and ``bench_<device>.png`` (when matplotlib is installed).

Usage::

    PYTHONPATH=src python benchmarks/bench_cuda.py               # GPU, all shapes
    PYTHONPATH=src python benchmarks/bench_cuda.py --device cpu --shapes small --reps 3
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as TF

import dynloss
import dynloss.functional as DF
from dynloss.kernels import region_pixel_loss

SHAPES = {
    "full": [
        ("binary", (32, 1, 256, 256)),
        ("multiclass", (8, 4, 256, 256)),
        ("binary", (2, 1, 128, 128, 128)),
        ("binary", (16, 1, 512, 512)),
    ],
    "small": [("binary", (4, 1, 32, 32)), ("multiclass", (2, 4, 16, 16))],
}
LOSSES = ["dice", "iou", "tversky", "bce", "focal", "topk"]
COMPOSITES = ["dice+bce", "dice+focal", "iou+bce", "tversky+bce", "iou+topk"]
TVERSKY = (0.3, 0.7)
TOPK = 0.6


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
    peak_extra_mb: float | None = None
    peak_extra_x_inputs: float | None = None
    ideal_bytes: int | None = None
    gbs: float | None = None
    copy_fraction: float | None = None
    max_abs_diff_vs_reference: float | None = None
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
    """The module, or a string saying why it is unavailable.

    Falls back to the copies in ``benchmarks/.vendor`` (smp: its ``losses`` subpackage as
    ``smp_losses``; MONAI as is), appended to ``sys.path`` so installed packages win.
    """
    try:
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
                losses=losses, __version__=version.get("smp", "?") + " (vendored losses)"
            )
        module = __import__(name)
        module.__version__ = f"{getattr(module, '__version__', '?')} (vendored)"
        return module
    except Exception as exc:
        return f"{reason}; vendored copy failed too: {type(exc).__name__}: {exc}"


def _plain_torch(loss: str, mode: str) -> Callable | None:
    """Eager PyTorch written the obvious way (what a user would write by hand)."""
    def probs(x):
        return x.float().softmax(1) if mode == "multiclass" else x.float().sigmoid()

    def onehot(x, t):
        if mode == "multiclass":
            return TF.one_hot(t, x.shape[1]).movedim(-1, 1).float()
        return t.float()

    def region(a, b):
        def fn(x, t):
            p, g = probs(x), onehot(x, t)
            dims = [0, *range(2, x.dim())]
            tp = (p * g).sum(dims)
            fp = (p * (1 - g)).sum(dims)
            fn_ = ((1 - p) * g).sum(dims)
            return (1 - (tp + 1e-7) / (tp + a * fp + b * fn_ + 1e-7)).mean()
        return fn

    def bce_el(x, t):
        if mode == "multiclass":
            return TF.cross_entropy(x.float(), t, reduction="none")
        return TF.binary_cross_entropy_with_logits(x.float(), t.float(), reduction="none")

    if loss == "dice":
        return region(0.5, 0.5)
    if loss == "iou":
        return region(1.0, 1.0)
    if loss == "tversky":
        return region(*TVERSKY)
    if loss == "bce":
        return lambda x, t: bce_el(x, t).mean()
    if loss == "focal":
        def focal(x, t):
            b = bce_el(x, t)
            return ((1 - torch.exp(-b)) ** 2 * b).mean()
        return focal
    if loss == "topk":
        def topk(x, t):
            b = bce_el(x, t).flatten()
            return b.topk(math.ceil(TOPK * b.numel())).values.mean()
        return topk
    return None


def _smp(smp, loss: str, mode: str) -> Callable | None:
    L = smp.losses
    if loss == "dice":
        return L.DiceLoss(mode)
    if loss == "iou":
        return L.JaccardLoss(mode)
    if loss == "tversky":
        return L.TverskyLoss(mode, alpha=TVERSKY[0], beta=TVERSKY[1])
    if loss == "focal":
        return L.FocalLoss(mode)
    if loss == "bce":
        if mode == "multiclass":
            return L.SoftCrossEntropyLoss(smooth_factor=0.0)
        return L.SoftBCEWithLogitsLoss()
    return None  # smp has no TopK


def _monai(monai_losses, loss: str, mode: str) -> Callable | None:
    mc = mode == "multiclass"
    kw = dict(softmax=True, to_onehot_y=True) if mc else dict(sigmoid=True)
    if loss == "dice":
        fn = monai_losses.DiceLoss(batch=True, **kw)
    elif loss == "iou":
        fn = monai_losses.DiceLoss(batch=True, jaccard=True, **kw)
    elif loss == "tversky":
        fn = monai_losses.TverskyLoss(alpha=TVERSKY[0], beta=TVERSKY[1], batch=True, **kw)
    elif loss == "focal":
        fn = monai_losses.FocalLoss(gamma=2.0, use_softmax=mc, to_onehot_y=mc)
    elif loss == "dice+bce":
        fn = monai_losses.DiceCELoss(batch=True, **kw)
    elif loss == "dice+focal":
        fn = monai_losses.DiceFocalLoss(batch=True, gamma=2.0, **kw)
    else:
        return None  # no BCE/TopK of its own (BCE is torch's)
    if mc:  # MONAI wants a channel dim on class-index targets
        return lambda x, t: fn(x, t.unsqueeze(1))
    return fn


def _dynloss(loss: str, mode: str, backend: str) -> Callable:
    kw = dict(mode=mode, backend=backend, check_values=False)
    if "+" in loss:
        region, pixel = loss.split("+")
        return lambda x, t: region_pixel_loss(x, t, region=region, pixel=pixel, **kw)
    fn = {"dice": DF.dice_loss, "iou": DF.iou_loss, "tversky": DF.tversky_loss,
          "bce": DF.bce_loss, "focal": DF.focal_loss, "topk": DF.topk_loss}[loss]
    if loss == "tversky":
        return lambda x, t: fn(x, t, *TVERSKY, **kw)
    if loss == "topk":
        return lambda x, t: fn(x, t, TOPK, **kw)
    return lambda x, t: fn(x, t, **kw)


def _composite(parts: list[Callable | None]) -> Callable | None:
    if any(p is None for p in parts):
        return None
    return lambda x, t: sum(p(x, t) for p in parts)  # type: ignore[misc]


# ---------------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def run(self, step: Callable[[], None], warmup: int, reps: int) -> list[float]:
        for _ in range(warmup):
            step()
        self.sync()
        times = []
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for start, end in events:
                start.record()
                step()
                end.record()
            self.sync()
            times = [s.elapsed_time(e) for s, e in events]
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
        return times


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def measure(fn: Callable, x: torch.Tensor, t: torch.Tensor, timer: Timer, warmup: int,
            reps: int) -> tuple[list[float], int | None]:
    """Per-iteration times (ms) and peak bytes allocated beyond what existed before."""
    xg = x.detach().clone().requires_grad_(True)

    def step() -> None:
        xg.grad = None
        fn(xg, t).backward()

    step()  # compile / warm caches before measuring memory
    xg.grad = None
    peak = None
    if timer.cuda:
        timer.sync()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(timer.device)
        torch.cuda.reset_peak_memory_stats(timer.device)
        step()
        timer.sync()
        peak = torch.cuda.max_memory_allocated(timer.device) - base
        xg.grad = None
    times = timer.run(step, warmup, reps)
    return times, peak


def copy_ms(nbytes: int, timer: Timer, warmup: int, reps: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device)
    dst = torch.empty_like(src)
    times = timer.run(lambda: dst.copy_(src), warmup, reps)
    return statistics.median(times)


def make_inputs(mode: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(shape, generator=gen, device=device) * 2).to(dtype)
    if mode == "multiclass":
        t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen, device=device)
    else:
        t = (torch.rand(shape, generator=gen, device=device) > 0.9).to(dtype)
    return x, t


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


def markdown(meta: dict, rows: list[Row]) -> str:
    lines = [f"# dynloss benchmark on {meta['device']}", ""]
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    lines.append("")
    lines.append(
        "Forward+backward time in ms (median of {reps} after {warmup} warm-up), peak memory "
        "beyond the inputs in multiples of the input's size (the gradient itself is 1.0), and "
        "for dynloss the ideal traffic (read input+target twice, write the gradient once) per "
        "second as a fraction of a device copy of input+target.".format(**meta["settings"])
    )
    for note in meta["notes"]:
        lines.append(f"- {note}")
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((tuple(r.shape), r.mode, r.dtype), []).append(r)
    impls = ["dynloss-triton", "dynloss-torch", "dynloss-reference", "smp", "monai", "torch"]
    for (shape, mode, dtype), grp in groups.items():
        copy = meta["copy"].get(f"{list(shape)}|{dtype}")
        lines += ["", f"## {mode} {tuple(shape)} {dtype}"
                  + (f" (copy of input+target: {copy['ms']:.3f} ms, {copy['gbs']:.0f} GB/s)"
                     if copy else ""), ""]
        present = [i for i in impls if any(r.impl == i for r in grp)]
        head = ["loss", *present, "best dynloss vs best smp/MONAI", "dynloss peak extra",
                "dynloss BW / copy"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        losses = list(dict.fromkeys(r.loss for r in grp))
        for loss in losses:
            by = {r.impl: r for r in grp if r.loss == loss}
            cells = [loss]
            for i in present:
                r = by.get(i)
                if r is None:
                    cells.append("–")
                elif r.error:
                    cells.append("error")
                else:
                    cells.append(f"{r.ms:.3f}")
            ours = [by[i] for i in ("dynloss-triton", "dynloss-torch")
                    if i in by and by[i].ms is not None]
            theirs = [by[i] for i in ("smp", "monai") if i in by and by[i].ms is not None]
            best = min(ours, key=lambda r: r.ms) if ours else None
            if best and theirs:
                cells.append(f"{min(r.ms for r in theirs) / best.ms:.1f}x")
            else:
                cells.append("–")
            if best and best.peak_extra_x_inputs is not None:
                cells.append(f"{best.peak_extra_x_inputs:.2f}")
            else:
                cells.append("–")
            cells.append(f"{best.copy_fraction:.0%}" if best and best.copy_fraction else "–")
            lines.append("| " + " | ".join(cells) + " |")
    errors = [r for r in rows if r.error]
    if errors:
        lines += ["", "## Errors and skips", ""]
        for r in errors:
            lines.append(f"- {r.mode} {tuple(r.shape)} {r.dtype} {r.loss} {r.impl}: {r.error}")
    return "\n".join(lines) + "\n"


def plot(path: Path, meta: dict, rows: list[Row]) -> str | None:
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
    fig, axes = plt.subplots(len(groups), 1, figsize=(12, 3.2 * len(groups)), squeeze=False)
    impls = ["dynloss-triton", "dynloss-torch", "dynloss-reference", "smp", "monai", "torch"]
    for ax, ((shape, mode, dtype), grp) in zip(axes[:, 0], groups.items(), strict=False):
        losses = list(dict.fromkeys(r.loss for r in grp))
        present = [i for i in impls if any(r.impl == i for r in grp)]
        width = 0.8 / max(1, len(present))
        for j, impl in enumerate(present):
            vals = [next((r.ms for r in grp if r.loss == loss and r.impl == impl), 0.0) or 0.0
                    for loss in losses]
            ax.bar([i + j * width for i in range(len(losses))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(losses))], losses)
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(f"{mode} {shape} {dtype} on {meta['device']}")
        ax.legend(fontsize=7, ncol=len(present))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# -------------------------------------------------------------------------------------- main


def warm(device: torch.device, dtypes: list[torch.dtype], shapes: list) -> int:
    """Compile every Triton kernel the benchmark will launch (on inputs of batch <= 2).

    The kernels are specialised on argument properties (divisibility by 16, equality to 1),
    not on sizes, so a smaller batch of the same shape compiles the same variants; run this in
    parallel with other work to keep compilation out of the timed benchmark.
    """
    started = time.monotonic()
    failures = 0
    for dtype in dtypes:
        for mode, shape in shapes:
            x, t = make_inputs(mode, (min(shape[0], 2), *shape[1:]), dtype, device)
            for loss in LOSSES + COMPOSITES:
                try:
                    xg = x.detach().clone().requires_grad_(True)
                    _dynloss(loss, mode, "triton")(xg, t).backward()
                except Exception as exc:
                    failures += 1
                    print(f"warm {mode} {shape} {dtype} {loss}: {type(exc).__name__}: {exc}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"warmed the Triton kernels in {time.monotonic() - started:.0f} s, {failures} failures")
    return 1 if failures else 0



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="full")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=150.0, help="seconds for the whole run")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--warm-only", action="store_true",
                        help="only compile the Triton kernels of every configuration (batch "
                             "cut to 2, same kernel specialisations), filling Triton's cache")
    parser.add_argument("--impls", default="dynloss-triton,dynloss-torch,dynloss-reference,"
                        "smp,monai,torch")
    args = parser.parse_args()
    started = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; nothing to benchmark (use --device cpu)")
        return 1
    if args.warm_only:
        return warm(device, [getattr(torch, d) for d in args.dtypes.split(",") if d],
                    SHAPES[args.shapes])
    timer = Timer(device)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, "
                        f"{torch.get_num_threads()} threads)")
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
    notes = []
    for name, mod in (("smp", smp), ("monai", monai)):
        if isinstance(mod, str):
            notes.append(f"{name} comparison skipped: package not importable ({mod})")
    impls = [i for i in args.impls.split(",") if i]
    if device.type != "cuda" and "dynloss-triton" in impls:
        impls.remove("dynloss-triton")
        notes.append("dynloss-triton skipped: not a CUDA device")
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",") if d]
    meta = {
        "device": device_name,
        "versions": versions({"smp": smp, "monai": monai}),
        "settings": {"reps": args.reps, "warmup": args.warmup, "budget_s": args.budget},
        "notes": notes,
        "copy": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "argv": sys.argv,
    }
    for note in notes:
        print("NOTE:", note, flush=True)
    rows: list[Row] = []

    def write() -> None:
        meta["elapsed_s"] = round(time.monotonic() - started, 1)
        data = {"meta": meta, "rows": [asdict(r) for r in rows]}
        (out / f"bench_{slug}.json").write_text(json.dumps(data, indent=1))
        (out / f"bench_{slug}.md").write_text(markdown(meta, rows))

    over_budget = False
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
                ms = copy_ms(x_bytes + t_bytes, timer, args.warmup, max(args.reps, 10))
                copy_bw = 2 * (x_bytes + t_bytes) / (ms * 1e-3) / 1e9
                meta["copy"][f"{list(shape)}|{dname}"] = {"ms": ms, "gbs": copy_bw,
                                                         "bytes": x_bytes + t_bytes}
            except Exception as exc:
                notes.append(f"copy {shape} {dname}: {type(exc).__name__}: {exc}")
            for loss in LOSSES + COMPOSITES:
                reference_value = None
                for impl in impls:
                    if time.monotonic() - started > args.budget:
                        over_budget = True
                        break
                    row = Row(list(shape), mode, dname, loss, impl, ideal_bytes=ideal)
                    try:
                        if impl.startswith("dynloss-"):
                            fn = _dynloss(loss, mode, impl.split("-", 1)[1])
                        elif impl == "torch":
                            fn = (_composite([_plain_torch(p, mode) for p in loss.split("+")])
                                  if "+" in loss else _plain_torch(loss, mode))
                        elif impl == "smp":
                            fn = None if isinstance(smp, str) else (
                                _composite([_smp(smp, p, mode) for p in loss.split("+")])
                                if "+" in loss else _smp(smp, loss, mode))
                        elif impl == "monai":
                            fn = None if monai_losses is None else _monai(monai_losses, loss, mode)
                        else:
                            raise ValueError(f"unknown impl {impl}")
                        if fn is None:
                            continue  # no such loss in that library
                        times, peak = measure(fn, x, t, timer, args.warmup, args.reps)
                        row.ms = statistics.median(times)
                        row.ms_p20 = _quantile(times, 0.2)
                        row.ms_p80 = _quantile(times, 0.8)
                        if peak is not None:
                            row.peak_extra_mb = peak / 2**20
                            row.peak_extra_x_inputs = peak / x_bytes
                        row.gbs = ideal / (row.ms * 1e-3) / 1e9
                        if copy_bw:
                            row.copy_fraction = row.gbs / copy_bw
                        if impl.startswith("dynloss"):
                            with torch.no_grad():
                                value = fn(x, t).float()
                            if impl == "dynloss-reference" or reference_value is None:
                                ref = _dynloss(loss, mode, "reference")
                                with torch.no_grad():
                                    reference_value = ref(x, t).float()
                            row.max_abs_diff_vs_reference = float(
                                (value - reference_value).abs().max())
                    except Exception as exc:
                        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                        if impl == "dynloss-triton":
                            row.extra["traceback"] = traceback.format_exc()[-3000:]
                    rows.append(row)
                    status = row.error or (
                        f"{row.ms:8.3f} ms  peak+{row.peak_extra_x_inputs or 0:5.2f}x  "
                        f"{(row.copy_fraction or 0):5.0%} of copy  "
                        f"diff {row.max_abs_diff_vs_reference}")
                    print(f"{mode:10s} {shape!s:22s} {dname:9s} {loss:12s} {impl:18s} {status}",
                          flush=True)
                if over_budget:
                    break
            del x, t
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write()
            if over_budget:
                break
        if over_budget:
            break
    if over_budget:
        notes.append(f"stopped early: the time budget of {args.budget:.0f} s was spent; "
                     "later shapes/dtypes are missing")
        print("NOTE:", notes[-1], flush=True)
    write()
    msg = plot(out / f"bench_{slug}.png", meta, rows)
    if msg:
        notes.append(msg)
        write()
    print(f"wrote {out}/bench_{slug}.{{json,md,png}} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
