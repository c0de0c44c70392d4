"""Forward+backward time and memory of every dynloss loss against smp, MONAI, nnU-Net and
plain torch, each peer in its own formulation (see ``competitors.py``; multiclass and
multilabel: ``peers.py``).

    python benchmarks/bench_cpu.py                       # (32, 1, 256, 256) float32, CPU
    python benchmarks/bench_cpu.py --shape 8 1 128 128 --repeats 30
    python benchmarks/bench_cpu.py --losses topk --out /tmp/topk   # one loss, elsewhere
    python benchmarks/bench_cpu.py --mode multiclass     # (8, 4, 256, 256), class-index target
    python benchmarks/bench_cpu.py --mode multilabel     # (8, 3, 256, 256), 0/1 per channel
    python benchmarks/bench_cpu.py --dtype bfloat16 --shape 16 1 128 128   # autocast logits
    python benchmarks/bench_cpu.py --dtype float64       # float64 input and target
    python benchmarks/bench_cpu.py --losses bce_weight_map focal_weight_map  # weight maps
    python benchmarks/bench_cpu.py --compile             # every candidate torch.compile'd

``--mode multiclass``: the target holds class indices (int64, ``(N, *spatial)``, drawn
uniformly from ``[0, C)``, ``C = shape[1] >= 2``); the losses are dynloss's multiclass ones
(``bce`` is the cross-entropy; no ``bce_pos_weight``), the peers those of ``peers.py`` (the
GPU benchmark's), each only where it computes the same loss (no smp Focal, no MONAI BCE/TopK;
MONAI's Focal times C); the yardstick is a ``torch.softmax`` pass over the classes.

``--mode multilabel``: the target is a 0/1 float tensor of the input's shape ``(N, C,
*spatial)``, ``C = shape[1] >= 2``, each channel its own binary problem (the channels overlap,
as BraTS's three regions do; ~10 % foreground per channel, drawn independently as in binary
mode); the losses are dynloss's multilabel ones (sigmoid per channel; Dice/IoU/Tversky score
each channel over the pooled batch, then average the channels; BCE/Focal/TopK average over
every element), the peers those of ``peers.py`` that compute them (smp's multilabel losses,
MONAI's sigmoid ones with ``batch=True``, plain torch, nnU-Net's TopK; MONAI has no BCE/TopK of
its own, smp no TopK); ``bce_pos_weight`` (the weight 3 for every channel) against smp's and
torch's BCE with ``pos_weight=[3]`` (``competitors.py``'s, which broadcast it over the
channels); the yardstick is a ``torch.sigmoid`` pass.

Before anything is timed, every candidate's value and gradient on a small input of the same
rank are checked against dynloss's reference (:func:`check_candidates`).

``--compile``: every candidate goes through ``torch.compile`` (Inductor, default options),
as in a user's compiled training step on the CPU: the peers' eager chains fused by the
compiler, dynloss's native kernels as custom operators (``dynloss[reference]``: its formulas
fused by the compiler); each is compiled, and checked against its own eager value and
gradient, before the warm-up (:func:`compiled_candidates`). ``saved`` is then an eager call's.
Time: median (and minimum) of ``--repeats`` forward+backward runs after warm-up, all in one
process, candidates interleaved round by round so that background load hits them alike.
Page faults: the minor page faults of each timed call (``getrusage``; Unix only). A call whose
temporaries land on memory the allocator has just taken from the system pays one fault per
4 KiB page (about 2000 per 8 MiB tensor), so a peer's median depends on the allocator's state;
the table also gives each candidate's median over its calls *without* a page fault, and the
summary the speed-up over the faster of smp/MONAI on those calls alone.
Memory: ``saved`` is what the loss keeps alive for backward: the bytes of the tensors autograd
saves (counted once per storage, the caller's input and target left out), in multiples of the
input's size. (Peak memory is measured on CUDA by ``bench_cuda.py``; the CPU allocator offers no
reliable peak counter.)
Results go to ``benchmarks/results/cpu.json`` and ``cpu.md`` (another ``--shape``:
``cpu_8x1x64x64.*``; multiclass: ``cpu_multiclass_8x4x256x256.*``, multilabel:
``cpu_multilabel_8x3x256x256.*``; ``--losses`` naming a subset
adds ``_<losses>``, so a partial run never replaces the full table; see :func:`default_name`),
each with the speed-up of ``dynloss[auto]`` over every peer per loss (``summary``): the faster
of smp/MONAI (or the one that has the loss), plain torch, and for TopK nnU-Net's formulation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dynloss
from competitors import HAVE_MONAI, HAVE_SMP, POS_WEIGHT, WEIGHT_MAPS, competitors
from dynloss.kernels import resolve_backend
from dynloss.kernels.native.ffi import recorded_calls
from peers import implementation

LOSSES = ["dice", "iou", "tversky", "focal", "bce", "topk"]
EXTRA_LOSSES = ["bce_pos_weight", *WEIGHT_MAPS]
"""Cases run only when named (``--losses bce_pos_weight``): BCE with ``pos_weight=3``; BCE
and Focal with a per-pixel weight map (``reduction="none"``, binary mode; see
``competitors.py``)."""
RESULTS = Path(__file__).resolve().parent / "results"


DEFAULT_SHAPE = [32, 1, 256, 256]
MODES = ["binary", "multiclass", "multilabel"]
DEFAULT_MULTICLASS_SHAPE = [8, 4, 256, 256]
DEFAULT_MULTILABEL_SHAPE = [8, 3, 256, 256]
MODE_PEERS = ["smp", "monai", "torch", "nnunet"]
"""The peers of ``--mode multiclass`` and ``multilabel``, from ``peers.py`` where it has the
loss."""
PASS = {"binary": "sigmoid", "multiclass": "softmax", "multilabel": "sigmoid"}
"""The yardstick of each mode: one pass of this activation over the input."""


DTYPES = ("float32", "float16", "bfloat16", "float64")
"""The logits' dtypes ``--dtype`` times (``float32`` the default; ``float64``: a float64 target
too, as a float64 pipeline has)."""


def default_name(shape, losses, mode="binary", dtype="float32", compiled=False):
    """The result files' name: ``cpu`` for every loss at the default shape, else suffixed by
    the shape (``cpu_8x1x64x64``) and by the losses when they are a subset, so that no run
    replaces another shape's or the full table; multiclass runs are ``cpu_multiclass_`` and
    the shape at every shape (``cpu_multiclass_8x4x256x256``), never a binary run's name;
    multilabel runs likewise ``cpu_multilabel_`` and the shape; a 16-bit input adds its
    dtype (``cpu_8x1x64x64_bfloat16``); ``--compile`` adds ``_compiled``."""
    dims = "x".join(map(str, shape))
    if mode in ("multiclass", "multilabel"):
        name = f"cpu_{mode}_" + dims
    else:
        name = "cpu" if list(shape) == DEFAULT_SHAPE else "cpu_" + dims
    if dtype != "float32":
        name += "_" + dtype
    if compiled:
        name += "_compiled"
    subset = [loss for loss in LOSSES + EXTRA_LOSSES if loss in losses]
    return name if subset == LOSSES else name + "_" + "_".join(subset)


def make_inputs(shape, seed=0, mode="binary"):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen) * 3
    if mode == "multiclass":  # class indices, uniform over the C = shape[1] classes
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    else:  # binary, multilabel: each element drawn alone, so multilabel channels overlap
        target = (torch.rand(shape, generator=gen) > 0.9).float()  # ~10 % foreground, as the paper
    return logits, target


def mode_competitors(name, mode, backends=("auto", "torch", "reference")):
    """Candidates for loss ``name`` (a key of ``dynloss.LOSSES``) in ``mode`` (``multiclass``
    or ``multilabel``), dynloss first: ``dynloss.LOSSES[name](mode=mode)`` with its default
    hyper-parameters (those of ``peers.py``: Tversky ``(0.3, 0.7)``, TopK ``k=0.6``, Focal
    ``gamma=2``, as in binary mode), then each peer of :data:`MODE_PEERS` that ``peers.py``
    gives for the loss in that mode (a library that is not installed is left out, as in
    ``competitors.py``)."""
    found = {f"dynloss[{backend}]": dynloss.LOSSES[name](mode=mode, backend=backend)
             for backend in backends}
    smp = "not installed"
    monai_losses = None
    if HAVE_SMP:
        import segmentation_models_pytorch as smp
    if HAVE_MONAI:
        import monai.losses as monai_losses
    for peer in MODE_PEERS:
        fn = implementation(peer, name, mode, smp, monai_losses, "auto")
        if fn is not None:
            found[peer] = fn
    return found


def multiclass_competitors(name, backends=("auto", "torch", "reference")):
    """:func:`mode_competitors` in multiclass mode."""
    return mode_competitors(name, "multiclass", backends)


def multilabel_competitors(name, backends=("auto", "torch", "reference")):
    """:func:`mode_competitors` in multilabel mode; ``"bce_pos_weight"``: dynloss's
    multilabel BCE with ``pos_weight=3`` (one weight for every channel), then the peers of
    ``competitors.py``'s binary case (smp's ``SoftBCEWithLogitsLoss`` and torch's
    ``BCEWithLogitsLoss`` with ``pos_weight=[3]``, which broadcasts over the channels: the same
    loss on a multilabel target; ``peers.py`` has no weighted BCE)."""
    if name != "bce_pos_weight":
        return mode_competitors(name, "multilabel", backends)
    found = {f"dynloss[{backend}]": dynloss.BCELoss(mode="multilabel", pos_weight=POS_WEIGHT,
                                                    backend=backend)
             for backend in backends}
    found.update(competitors(name, backends=()))  # (its peers alone)
    return found


def candidates_of(name, mode, backends=("auto", "torch", "reference")):
    """Every candidate for loss ``name`` in ``mode``, dynloss first (one per backend)."""
    if mode == "multiclass":
        return multiclass_competitors(name, backends)
    if mode == "multilabel":
        return multilabel_competitors(name, backends)
    return competitors(name, backends)


COMPILED_BACKENDS = ("auto", "reference")
"""dynloss's candidates of a ``--compile`` run: the backends that run inside a graph on the
CPU (``"torch"`` would give way to the reference)."""


def compiled_candidates(candidates, logits, target):
    """Each candidate through ``torch.compile`` (Inductor, default options: a peer that breaks
    the graph runs in pieces, as it would in a user's compiled step), compiled here by one
    forward+backward and checked against its eager value and gradient on the timed input
    (``ValueError`` where compiling changed them, or compiled no graph: a compiled value or
    gradient within ``rtol=1e-4`` of neither the eager one nor the eager one in float64);
    ``dynloss[eager]``: ``dynloss[auto]`` not compiled, beside them. Returns ``(candidates,
    in_graph)``: ``in_graph`` the backend that ran inside ``dynloss[auto]``'s graph
    (``"native"`` where the native kernels' entry points were called, else the reference)."""
    import torch._dynamo.utils

    # Dynamo keeps at most 8 compiled versions of one function (dynloss's losses share their
    # base class's forward) and runs the rest eagerly without a word: forget the last loss's
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters["stats"]
    compiled = {}
    in_graph = None
    for label, fn in candidates.items():
        compiled[label] = torch.compile(fn)
        if label == "dynloss[auto]":  # what the same step gets with the loss left eager
            compiled["dynloss[eager]"] = fn
        x = logits.detach().requires_grad_()
        want = fn(x, target)
        want.backward()
        y = logits.detach().requires_grad_()
        graphs = counters["unique_graphs"]
        with recorded_calls() as calls:
            got = compiled[label](y, target)
            got.backward()
        if label == "dynloss[auto]":  # what ran inside the graph, as measured
            in_graph = "native" if calls else "reference"
        if counters["unique_graphs"] == graphs:
            raise ValueError(f"{label}: torch.compile compiled no graph (it ran eagerly)")
        exact = _float64_call(fn, logits, target)
        for what, a, b, c in (("value", got, want, exact[0]), ("gradient", y.grad, x.grad,
                                                                exact[1])):
            if not any(torch.allclose(a.double(), truth.double(), rtol=1e-4, atol=1e-6)
                       for truth in (b, c) if truth is not None):
                raise ValueError(f"{label}: compiled, its {what} differs from its eager one "
                                 "(in the input's dtype and in float64)")
    return compiled, in_graph


def _float64_call(fn, logits, target):
    """``fn``'s eager value and gradient in float64 (a float target too), or ``(None, None)``
    where it cannot take float64: what a compiled candidate may match instead of its eager
    value in the input's dtype, which can be the less exact one (smp's multiclass Dice in
    float32 at (8, 4, 256, 256): 2.4e-4 off, compiled 1e-7)."""
    x = logits.detach().double().requires_grad_()
    t = target.double() if target.is_floating_point() else target
    try:
        value = fn(x, t)
        value.backward()
    except (RuntimeError, TypeError, ValueError):
        return None, None
    return value.detach(), x.grad


PROBE_SIDE = 5
"""The spatial size of the probe on which the candidates are checked before timing."""


def probe_shape(shape):
    """A small input of ``shape``'s rank and channels, two samples of side
    :data:`PROBE_SIDE`: ``2 * C * 5**d`` elements, of which 60 % (TopK's ``k``) is a whole
    number, so that nnU-Net's count (rounded down) and dynloss's (up) agree exactly. Where
    the ``2 * 5**d`` pixels cannot hold each of ``C`` classes once (multiclass), the side is
    the smallest multiple of :data:`PROBE_SIDE` whose pixels can (60 % stays whole)."""
    dims = len(shape) - 2
    side = PROBE_SIDE
    while dims > 0 and 2 * side**dims < shape[1]:
        side += PROBE_SIDE
    return (2, *shape[1:2], *[side] * dims)


def check_candidates(name, candidates, shape, mode="binary"):
    """Raise ``ValueError`` where a candidate's value or input gradient on a
    :func:`probe_shape` input differs from ``dynloss[reference]``'s: a peer given other
    arguments (another smoothing, pooling or weight) would be timed as the same loss."""
    probe = probe_shape(shape)
    logits, target = make_inputs(probe, seed=1, mode=mode)
    logits[1:] *= 0.25  # samples of other scales: a per-sample TopK keeps other elements
    if mode == "multiclass":  # every class present: smp's loss for an absent class is 0
        classes = probe[1]  # (dynloss's 1), another loss where a class is missing
        target.view(-1)[:classes] = torch.arange(classes)
    elif mode == "multilabel":  # a positive in each sample's every channel: smp scores an
        target.view(2, probe[1], -1)[:, :, 0] = 1  # empty channel 0 (dynloss 1)
    else:
        target.view(2, -1)[:, 0] = 1  # a positive in each sample: smp scores no empty class

    def value_and_gradient(fn):
        x = logits.detach().clone().requires_grad_()
        value = fn(x, target)
        (gradient,) = torch.autograd.grad(value, x)
        return value.detach(), gradient

    want = value_and_gradient(candidates["dynloss[reference]"])
    for label, fn in candidates.items():
        got = value_and_gradient(fn)
        for what, a, b, rtol in (("value", got[0], want[0], 1e-5),
                                 ("gradient", got[1], want[1], 1e-4)):
            if not torch.allclose(a, b, rtol=rtol, atol=1e-7):
                difference = (a - b).abs().max().item()
                raise ValueError(
                    f"{name}: {label}'s {what} on a {probe} probe differs from dynloss's "
                    f"reference (by up to {difference:.3g}): it would be timed as another loss")


REGION_LOSSES = ("dice", "iou", "tversky")
"""The losses smp scores 0 for a class (channel) absent from the whole batch, dynloss and
MONAI 1."""


def check_timed_target(name, candidates, target, mode, channels):
    """Raise ``ValueError`` where smp is timed for a region loss on a target in which a class
    (multiclass) or a channel's positives (binary, multilabel) is absent from the whole batch:
    smp scores it 0, dynloss and MONAI 1, so smp would be timed computing another loss (the
    candidates were checked on a probe that holds every class)."""
    if name not in REGION_LOSSES or "smp" not in candidates:
        return
    if mode == "multiclass":
        absent = sorted(set(range(channels)) - set(target.unique().tolist()))
        what = "pixel of class"
    else:
        counts = target.transpose(0, 1).reshape(channels, -1).sum(1)
        absent = [c for c in range(channels) if counts[c] == 0]
        what = "positive of channel"
    if absent:
        shown = ", ".join(map(str, absent[:8])) + (", ..." if len(absent) > 8 else "")
        raise ValueError(f"{name}: the timed target has no {what} {shown}: smp scores it 0 "
                         "where dynloss and MONAI score 1, so smp would be timed computing "
                         "another loss; a larger --shape holds every one")


def output_paths(out):
    """The result files of ``--out`` (a path without suffix; a dot in its name is kept)."""
    out = Path(out)
    return out.with_name(out.name + ".json"), out.with_name(out.name + ".md")


def run_once(fn, logits, target):
    x = logits.detach().requires_grad_()
    fn(x, target).backward()
    return x.grad


def saved_bytes(fn, logits, target):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = logits.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(x, target)
    loss.backward()
    storages.pop(target.untyped_storage().data_ptr(), None)  # the caller holds these anyway
    storages.pop(x.untyped_storage().data_ptr(), None)
    return sum(storages.values())


def kept_bytes(fn, logits, target):
    """The bytes dynloss keeps allocated between calls after one forward+backward whose
    gradient was dropped: the native backend's pooled buffers (0 for every peer)."""
    from dynloss.kernels.native import buffer_pool

    pools = list(buffer_pool._POOLS)
    for pool in pools:
        pool.clear()
    run_once(fn, logits, target)  # the gradient it returns is dropped here
    kept = sum(pool.nbytes() for pool in pools)
    for pool in pools:
        pool.clear()
    return kept


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def summarize(times, faults):
    """``(median, minimum, median faults, median of the calls without a page fault or None,
    how many such calls)`` of one candidate's seconds and page faults per call."""
    clean = [t for t, f in zip(times, faults, strict=True) if f == 0]
    return (statistics.median(times), min(times), statistics.median(faults),
            statistics.median(clean) if clean else None, len(clean))


def time_candidates(candidates, logits, target, repeats, warmup, seed=0):
    """Per candidate, :func:`summarize` of its forward+backward calls. Candidates are
    interleaved, in a new (seeded) order every round: a call runs measurably slower right
    after some others (the allocator's state after freeing their temporaries), so a fixed
    order would favour some; each run draws its seed (``main``)."""
    for fn in candidates.values():
        for _ in range(warmup):
            run_once(fn, logits, target)
    times = {label: [] for label in candidates}
    faults = {label: [] for label in candidates}
    order = list(candidates)
    shuffle = random.Random(seed).shuffle
    for _ in range(repeats):
        shuffle(order)
        for label in order:
            fn = candidates[label]
            before = _minor_faults()
            start = time.perf_counter()
            run_once(fn, logits, target)
            times[label].append(time.perf_counter() - start)
            faults[label].append(_minor_faults() - before)
    return {label: summarize(times[label], faults[label]) for label in candidates}


def no_fault_ratio(timed, ours_clean):
    """The faster of smp/MONAI over dynloss, each over its calls without a page fault (what a
    tuned allocator would give every call); None unless every peer and dynloss had such calls
    (the faster peer is unknown otherwise: one without any would be left out)."""
    peers = [timed[k][3] for k in ("smp", "monai") if k in timed]
    if not peers or ours_clean is None or any(clean is None for clean in peers):
        return None
    return min(peers) / ours_clean


def sigmoid_pass(logits, repeats, mode="binary"):
    """The median seconds of the yardstick :data:`PASS`: ``torch.sigmoid`` of the input
    (binary, multilabel), ``torch.softmax`` over its classes (multiclass)."""
    activation = (lambda x: torch.softmax(x, 1)) if mode == "multiclass" else torch.sigmoid
    ts = []
    for _ in range(repeats):
        start = time.perf_counter()
        activation(logits)
        ts.append(time.perf_counter() - start)
    return statistics.median(ts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="binary",
                        help="multiclass: a class-index target over C = shape[1] >= 2 classes; "
                             "multilabel: a 0/1 target of the input's shape, C >= 2 channels")
    parser.add_argument("--shape", type=int, nargs="+", default=None,
                        help="N C *spatial (default: 32 1 256 256; multiclass: 8 4 256 256; "
                             "multilabel: 8 3 256 256)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES + EXTRA_LOSSES)
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the logits' dtype (float16/bfloat16: a network under "
                             "torch.autocast, the target as in float32; float64: a float64 "
                             "target too, class indices as they are)")
    parser.add_argument("--compile", action="store_true",
                        help="time every candidate through torch.compile (Inductor; compiled "
                             "before the warm-up): a compiled training step on the CPU")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the candidates' order in each round (default: drawn "
                             "afresh and recorded, so that runs see different orders)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output path without suffix (default: benchmarks/results/cpu, "
                             "or cpu_<losses> for a subset of the losses)")
    args = parser.parse_args(argv)
    multiclass = args.mode == "multiclass"
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1; got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0; got {args.warmup}")
    if args.shape is None:
        args.shape = list({"multiclass": DEFAULT_MULTICLASS_SHAPE,
                           "multilabel": DEFAULT_MULTILABEL_SHAPE}.get(args.mode, DEFAULT_SHAPE))
    shown = " ".join(map(str, args.shape))
    if args.mode == "binary" and len(args.shape) >= 2 and args.shape[1] != 1:
        parser.error(f"--mode binary needs C = shape[1] = 1 channel, got --shape {shown} "
                     "(several channels are --mode multilabel)")
    if args.mode != "binary" and (len(args.shape) < 2 or args.shape[1] < 2):
        parser.error(f"--mode {args.mode} needs C = shape[1] >= 2 "
                     f"{'classes' if multiclass else 'channels'}, got --shape "
                     f"{shown} (one channel is --mode binary)")
    if len(args.shape) < 3:
        parser.error(f"--shape needs N, C and at least one spatial size, got --shape {shown}")
    if multiclass and "bce_pos_weight" in args.losses:
        parser.error("bce_pos_weight weighs the positives of binary and multilabel targets: "
                     "not with --mode multiclass")
    maps = [loss for loss in args.losses if loss in WEIGHT_MAPS]
    if maps and args.mode != "binary":
        parser.error(f"{maps[0]} is measured in binary mode only: not with --mode {args.mode}")
    missing = [name for name, have in (("segmentation-models-pytorch", HAVE_SMP),
                                       ("monai", HAVE_MONAI)) if not have]
    if missing:
        what = f"{' and '.join(missing)} not installed (pip install -e \".[test]\")"
        if args.out is None:  # the committed tables would lose their peers' rows
            print(f"bench_cpu.py: error: {what}; the results would compare with no peer. "
                  "Install them, or pass --out to write elsewhere.", file=sys.stderr)
            return 2
        print(f"not measured: {what}")
    if args.out is None:
        args.out = RESULTS / default_name(args.shape, args.losses, args.mode, args.dtype,
                                          args.compile)

    seed = random.SystemRandom().randrange(2**32) if args.seed is None else args.seed
    shape = tuple(args.shape)
    backends = COMPILED_BACKENDS if args.compile else ("auto", "torch", "reference")
    every = {name: candidates_of(name, args.mode, backends) for name in args.losses}
    try:  # all before the first timing: a wrong peer stops the run at once
        for name, candidates in every.items():
            check_candidates(name, candidates, shape, args.mode)
    except ValueError as error:
        print(f"bench_cpu.py: error: {error}", file=sys.stderr)
        return 2
    logits, target = make_inputs(shape, mode=args.mode)
    logits = logits.to(getattr(torch, args.dtype))
    if args.dtype == "float64" and target.is_floating_point():
        target = target.double()
    try:
        for name, candidates in every.items():
            check_timed_target(name, candidates, target, args.mode, shape[1])
    except ValueError as error:
        print(f"bench_cpu.py: error: {error}", file=sys.stderr)
        return 2
    eager = every
    input_bytes = logits.numel() * logits.element_size()
    activation = PASS[args.mode]
    sig = sigmoid_pass(logits, args.repeats, args.mode)
    meta = {
        "device": platform.processor() or platform.machine(),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "mode": args.mode,
        "shape": shape,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "dynloss": dynloss.__version__,
        "auto_backend": resolve_backend(logits, "auto"),
        "smp": _version("segmentation_models_pytorch") if HAVE_SMP else None,
        "monai": _version("monai") if HAVE_MONAI else None,
        "repeats": args.repeats,
        "compiled": args.compile,
        "order_seed": seed,
        f"{activation}_ms": sig * 1e3,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _commit(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg")
        else None,
    }
    print(f"CPU {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, "
          f"{'' if args.mode == 'binary' else args.mode + ' '}shape {shape}"
          f"{'' if args.dtype == 'float32' else ' ' + args.dtype}; "
          f"torch.{activation} pass: "
          f"{sig * 1e3:.2f} ms; dynloss[auto] runs backend {meta['auto_backend']!r}")
    rows = []
    summaries = {}
    for name, candidates in every.items():
        in_graph = None
        if args.compile:  # (one loss's candidates at a time: see compiled_candidates)
            try:
                candidates, in_graph = compiled_candidates(candidates, logits, target)
            except ValueError as error:
                print(f"bench_cpu.py: error: {error}", file=sys.stderr)
                return 2
        timed = time_candidates(candidates, logits, target, args.repeats, args.warmup,
                                seed=seed)
        ours, _, _, ours_clean, _ = timed["dynloss[auto]"]
        peers = [k for k in ("smp", "monai") if k in timed]
        libraries = [timed[k][0] for k in peers]
        best_library = min(libraries) if libraries else None
        clean_ratio = no_fault_ratio(timed, ours_clean)
        for label, (median, minimum, faults, clean, clean_count) in timed.items():
            # (of the eager call: saved-tensor hooks would recompile a compiled one)
            source = eager[name].get(label, candidates[label])  # (dynloss[eager]: itself)
            saved = saved_bytes(source, logits, target)
            kept = kept_bytes(source, logits, target)
            row = {
                "loss": name, "implementation": label, "median_ms": median * 1e3,
                "min_ms": minimum * 1e3, "speedup_of_dynloss": median / ours,
                "saved_inputs": saved / input_bytes, "kept_inputs": kept / input_bytes,
                "page_faults": faults,
                "no_fault_median_ms": None if clean is None else clean * 1e3,
                "no_fault_calls": clean_count,
            }
            rows.append(row)
        ratios = {"dynloss_ms": ours * 1e3, f"{activation}_passes": ours / sig}
        if in_graph is not None:
            ratios["in_graph"] = in_graph
        summary = f"{name:8s} dynloss {ours * 1e3:7.2f} ms"
        if best_library:
            ratios["vs_smp_monai"] = best_library / ours
            ratios["peers"] = peers
            ratio = best_library / ours  # (below 1: dynloss is the slower)
            summary += f" | {_speed(ratio, 5)} than {_peers_label(peers)}"
        if clean_ratio is not None:
            ratios["vs_smp_monai_no_faults"] = clean_ratio
            summary += f" ({_speed(clean_ratio)} on calls without page faults)"
        if "torch" in timed:
            ratios["vs_torch"] = timed["torch"][0] / ours
            summary += f" | {_speed(timed['torch'][0] / ours, 5)} than plain torch"
        if "nnunet" in timed:
            ratios["vs_nnunet"] = timed["nnunet"][0] / ours
            summary += (f" | {_speed(timed['nnunet'][0] / ours, 5)} than nnU-Net "
                        "(torch.topk unsorted)")
        summary += f" | {ours / sig:5.2f}x a {activation} pass"
        summaries[name] = ratios
        print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_paths(args.out)
    json_path.write_text(json.dumps({"meta": meta, "summary": summaries, "rows": rows},
                                    indent=2))
    md_path.write_text(to_markdown(meta, rows, summaries))
    print(f"wrote {json_path} and {md_path}")


PEERS = {"vs_smp_monai": "the faster of smp/MONAI",
         "vs_smp_monai_no_faults": "the faster of smp/MONAI on calls without page faults",
         "vs_torch": "plain torch",
         "vs_nnunet": "nnU-Net's formulation (`torch.topk(sorted=False)`)"}


def _speed(ratio, width=0):
    """A peer's time over dynloss's as words: ``"2.50x faster"``, or ``"1.52x slower"`` below
    1 (the printed summary says both the same way)."""
    return (f"{ratio:{width}.2f}x faster" if ratio >= 1
            else f"{1 / ratio:{width}.2f}x slower")


def _peers_label(peers):
    """"smp" where only smp has the loss, else "the faster of smp/MONAI"."""
    names = {"smp": "smp", "monai": "MONAI"}
    if len(peers) == 1:
        return names[peers[0]]
    return "the faster of " + "/".join(names[p] for p in peers)


def _versus_label(key, ratios, timed=()):
    """How the summary names the peers of ratio ``key``; ``timed``: the peers with a row
    (summaries written before ``peers`` was recorded said smp/MONAI also where only smp
    was timed)."""
    label = PEERS[key]
    peers = ratios.get("peers") or list(timed)
    if peers and key.startswith("vs_smp_monai"):
        label = label.replace("the faster of smp/MONAI", _peers_label(peers))
    return label


MULTICLASS_NOTE = (
    "Multiclass: the target holds class indices, drawn uniformly from the {classes} classes; "
    "`bce` is dynloss's multiclass BCE, the cross-entropy. The peers are `peers.py`'s (the GPU "
    "benchmark's), each only where it computes the same loss: smp's Dice/IoU/Tversky and "
    "`SoftCrossEntropyLoss`; MONAI's Dice/IoU/Tversky and its softmax `FocalLoss` times C "
    "(its mean is over the classes too); plain torch for every loss; nnU-Net's TopK. smp's "
    "multiclass `FocalLoss` (one-vs-rest sigmoid) is another loss and is not timed.")
MULTILABEL_NOTE = (
    "Multilabel: the target is a 0/1 float tensor of the input's shape, each of the {channels} "
    "channels its own binary problem (sigmoid per channel), drawn independently with ~10 % "
    "foreground per channel, so that the channels overlap (as BraTS's regions do). Dice/IoU/"
    "Tversky score each channel over the pooled batch, then average the channels; BCE, Focal "
    "and TopK average over every element. The peers are `peers.py`'s (the GPU benchmark's), "
    "each only where it computes the same loss: smp's multilabel Dice/Jaccard/Tversky/Focal "
    "and `SoftBCEWithLogitsLoss`; MONAI's sigmoid Dice/IoU/Tversky (`batch=True`: per channel "
    "over the batch, then the mean) and its sigmoid `FocalLoss`; plain torch for every loss; "
    "nnU-Net's TopK. Not timed: MONAI has no BCE or TopK of its own (its BCE is torch's), smp "
    "no TopK. `bce_pos_weight` (weight 3 for every channel): smp's and torch's BCE with "
    "`pos_weight=[3]`. smp scores a channel without positives as 0 (dynloss 1): every channel "
    "of these random targets has positives.")


def to_markdown(meta, rows, summaries=None):
    multiclass = meta.get("mode") == "multiclass"
    multilabel = meta.get("mode") == "multilabel"
    activation = "softmax" if "softmax_ms" in meta else "sigmoid"
    note = (MULTICLASS_NOTE.format(classes=meta["shape"][1]) if multiclass
            else MULTILABEL_NOTE.format(channels=meta["shape"][1]) if multilabel else None)
    lines = [
        f"# CPU benchmark: forward + backward, "
        f"{meta['mode'] + ', ' if multiclass or multilabel else ''}"
        f"shape {tuple(meta['shape'])} {meta['dtype']}"
        + (", every candidate compiled (`torch.compile`)" if meta.get("compiled") else ""),
        "",
        f"{meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, smp {meta['smp']}, "
        f"MONAI {meta['monai']}, dynloss {meta['dynloss']} ({meta.get('commit') or '?'}); "
        f"{meta['date']}, load average {meta.get('load_average')}. "
        f"`dynloss[auto]` ran the `{meta.get('auto_backend', '?')}` backend"
        + (" eagerly (inside a graph: see each loss below)." if meta.get("compiled") else "."),
        f"Median of {meta['repeats']} runs"
        + (f", candidates in a new order every round (order seed {meta['order_seed']})"
           if meta.get("order_seed") is not None else "")
        + f". One `torch.{activation}` pass over the input"
        + (" (over its classes)" if activation == "softmax" else "")
        + f": {meta[activation + '_ms']:.2f} ms. "
        "*dynloss speed-up*: this row's median over dynloss's. "
        "*saved*: tensors kept for backward beyond the caller's input and target, in multiples "
        "of the input's size" + (" (of an eager call)" if meta.get("compiled") else "")
        + ". *kept*: memory dynloss keeps allocated between calls once the "
        "gradient is dropped (the native backend's pooled buffers, reused by the next call), "
        "in the same unit. *faults*: median minor page faults per call; *no-fault ms*: "
        "median over the calls without a page fault (how many of them in brackets).",
        *(["", note] if note else []),
        "",
        "| loss | implementation | median ms | min ms | dynloss speed-up | saved | kept "
        "| faults | no-fault ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        clean = r.get("no_fault_median_ms")
        clean_cell = "–" if clean is None else f"{clean:.2f} ({r['no_fault_calls']})"
        kept = r.get("kept_inputs")  # (results written before the column existed: –)
        kept_cell = "–" if kept is None else f"{kept:.2f}"
        lines.append(
            f"| {r['loss']} | {r['implementation']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} "
            f"| {r['speedup_of_dynloss']:.2f}x | {r['saved_inputs']:.2f} | {kept_cell} "
            f"| {r.get('page_faults', 0):.0f} | {clean_cell} |"
        )
    if summaries:
        lines += ["", "Speed-up of `dynloss[auto]` (median over median):", ""]
        for name, ratios in summaries.items():
            timed = [peer for peer in ("smp", "monai")
                     if any(r["loss"] == name and r["implementation"] == peer for r in rows)]
            versus = [f"{ratios[key]:.2f}x over {_versus_label(key, ratios, timed)}"
                      for key in PEERS if key in ratios]
            label = f"{name} (cross-entropy)" if multiclass and name == "bce" else name
            where = (f" (inside the graph: the {ratios['in_graph']} backend)"
                     if "in_graph" in ratios else "")
            lines.append(f"- {label}: {ratios['dynloss_ms']:.2f} ms{where}; "
                         + ", ".join(versus))
    return "\n".join(lines) + "\n"


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit():
    """The checked-out commit (and ``+dirty`` with local changes outside
    ``benchmarks/results``), or None outside git."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                              capture_output=True, check=True).stdout.strip()
        # the result files this script writes do not count (a second run would see them)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":/", ":(exclude,top)benchmarks/results"],
                               cwd=here, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def _version(module):
    import importlib

    return getattr(importlib.import_module(module), "__version__", None)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
