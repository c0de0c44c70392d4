"""Write docs/generated/comparison_{region,distribution}.md: dynloss, smp, MONAI and nnU-Net
on the same inputs, one table per loss family.

The numbers on the two loss pages (docs/losses/region.md, docs/losses/distribution.md; each
includes its table) come from this script, so they stay true: CI runs it with ``--check``
(fails if a committed table differs from a fresh run) before building the site.

    python docs/compare_table.py            # rewrite both tables
    python docs/compare_table.py --check    # exit 1 if either is out of date

Needs the ``test`` extra (segmentation-models-pytorch, MONAI). nnU-Net is not a dependency:
its TopK loss is re-implemented below from its source (a few lines, quoted in the comment).
Inputs are fixed float64 tensors, so the values do not depend on the machine.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from monai.losses import DiceLoss as MonaiDiceLoss
from monai.losses import FocalLoss as MonaiFocalLoss

import dynloss

GENERATED = Path(__file__).resolve().parent / "generated"
FAMILIES = ("region", "distribution")
OUT = {family: GENERATED / f"comparison_{family}.md" for family in FAMILIES}
NA = "–"
LIBRARIES = ("dynloss", "smp 0.6", "MONAI", "nnU-Net")

# What each family's table calls and how, below the table.
NOTES = {
    "region": (
        "All losses are called with their defaults in binary mode. smp: "
        "`segmentation_models_pytorch.losses.DiceLoss(\"binary\")`. MONAI: "
        "`monai.losses.DiceLoss(sigmoid=True)` (per image, its default) and `batch=True` for "
        "the soft-label row. Inputs are fixed float64 tensors."
    ),
    "distribution": (
        "All losses are called with their defaults except where the row says otherwise "
        "(binary mode for BCE; multiclass with C = 2 for TopK, as nnU-Net's TopK is a "
        "softmax cross-entropy). smp: `segmentation_models_pytorch.losses."
        "SoftBCEWithLogitsLoss` and `FocalLoss`. MONAI: `monai.losses.FocalLoss` (sigmoid; "
        "`use_softmax=True, to_onehot_y=True` in multiclass mode); it has no BCE or TopK "
        "loss with these options. "
        "nnU-Net: its `TopKLoss` re-implemented from its source (`int(num_voxels * k / 100)` "
        "largest cross-entropy values). Inputs are fixed float64 tensors; \"–\" means the "
        "library has no such option."
    ),
}


def fmt(value: float | str) -> str:
    if isinstance(value, str):
        return value
    value = float(value)
    if value == 0.0 or abs(value) >= 1e-3:
        return f"{value:.4f}".replace("-0.0000", "0.0000")
    return f"{value:.1e}"


def nnunet_topk(logits: torch.Tensor, labels: torch.Tensor, k: float) -> float:
    """nnU-Net's ``TopKLoss(k)`` (nnunetv2/training/loss/robust_ce_loss.py), re-implemented.

    It takes the per-voxel cross-entropy and keeps ``int(num_voxels * k / 100)`` of the
    largest values: ``k`` is a percentage and the count is truncated, not rounded up.
    """
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    count = int(ce.numel() * k / 100)
    return torch.topk(ce.reshape(-1), count, sorted=False).values.mean().item()


def topk_kept(m: int, k: float) -> str:
    return f"{math.ceil(round(k * m, 9))} of {m}"


Row = tuple[str, str, str, str, str, str, str]  # family, case, 4 libraries, why


def rows() -> list[Row]:
    """Every row, in the order the inputs are drawn from one seeded generator."""
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    out = []

    # 1. Dice on a batch whose target is empty, with false positives (p = sigmoid(-1) = 0.27).
    logits = torch.full((2, 1, 8, 8), -1.0, dtype=f64)
    empty = torch.zeros(2, 1, 8, 8, dtype=f64)
    out.append((
        "region",
        "Dice, empty target, p = 0.27 everywhere",
        fmt(dynloss.DiceLoss()(logits, empty).item()),
        fmt(smp.losses.DiceLoss("binary")(logits, empty).item()),
        fmt(MonaiDiceLoss(sigmoid=True)(logits, empty).item()),
        NA,
        "smp scores a class absent from the batch as 0, so false positives on empty images "
        "cost nothing; dynloss and MONAI give P/(P+s), near 1",
    ))

    # 2. Dice, empty target and (almost) empty prediction.
    logits = torch.full((2, 1, 8, 8), -30.0, dtype=f64)
    out.append((
        "region",
        "Dice, empty target, empty prediction",
        fmt(dynloss.DiceLoss()(logits, empty).item()),
        fmt(smp.losses.DiceLoss("binary")(logits, empty).item()),
        fmt(MonaiDiceLoss(sigmoid=True)(logits, empty).item()),
        NA,
        "all near 0: a correct empty prediction costs (almost) nothing",
    ))

    # 3. BCE with ignore_index: half the pixels are 255.
    logits = torch.randn(2, 1, 8, 8, generator=gen, dtype=f64)
    target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).to(f64)
    target[..., :4] = 255
    kept = target != 255
    on_kept = torch.nn.functional.binary_cross_entropy_with_logits(logits[kept], target[kept])
    out.append((
        "distribution",
        "BCE, `ignore_index=255` on half the pixels",
        fmt(dynloss.BCELoss(ignore_index=255)(logits, target).item()),
        fmt(smp.losses.SoftBCEWithLogitsLoss(ignore_index=255)(logits, target).item()),
        NA,
        NA,
        f"dynloss = BCE over the kept pixels ({fmt(on_kept.item())}); smp counts ignored "
        "pixels as zeros in the mean (half the value); MONAI has no BCE with ignore_index",
    ))

    # 4. Dice with soft labels (g = 0.3 everywhere), pooled over the batch.
    logits = torch.randn(2, 1, 8, 8, generator=gen, dtype=f64)
    soft = torch.full((2, 1, 8, 8), 0.3, dtype=f64)
    out.append((
        "region",
        "Dice, soft labels g = 0.3 (batch-pooled)",
        fmt(dynloss.DiceLoss()(logits, soft).item()),
        fmt(smp.losses.DiceLoss("binary")(logits, soft).item()),
        fmt(MonaiDiceLoss(sigmoid=True, batch=True)(logits, soft).item()),
        NA,
        "smp's intersection (P + G − ‖p − g‖₁)/2 equals Σpg only for hard labels; dynloss "
        "and MONAI use Σpg",
    ))

    # 5-6. TopK: a fraction here, a truncated percentage in nnU-Net.
    for shape in ((1, 2, 10, 10), (1, 2, 5, 19)):
        m = shape[2] * shape[3]
        logits = torch.randn(*shape, generator=gen, dtype=f64)
        labels = torch.randint(0, 2, (shape[0], *shape[2:]), generator=gen)
        ours = dynloss.TopKLoss(k=0.1, mode="multiclass")(logits, labels).item()
        kept_nnunet = int(m * 10 / 100)
        out.append((
            "distribution",
            f"TopK, M = {m} pixels: dynloss `k=0.1`, nnU-Net `k=10`",
            fmt(ours),
            NA,
            NA,
            fmt(nnunet_topk(logits, labels, 10)),
            f"dynloss keeps ⌈0.1·M⌉ = {topk_kept(m, 0.1)}, nnU-Net int(M·10/100) = "
            f"{kept_nnunet} of {m}" + (": the same loss" if m == 100 else ": they differ"),
        ))

    # 7. A percentage passed as dynloss's k is an error, not a silent 100 %.
    try:
        dynloss.TopKLoss(k=10)
        refused = "accepted"
    except ValueError:
        refused = "`ValueError`"
    out.append((
        "distribution",
        "TopK, `k=10` (nnU-Net's spelling)",
        refused,
        NA,
        NA,
        "10 %",
        "dynloss's k is a fraction in (0, 1]; a percentage is refused rather than read as 1000 %",
    ))

    # 8. nnU-Net's k=1 is 1 %; dynloss's k=1 is every pixel (a valid fraction, not refused).
    logits = torch.randn(1, 2, 10, 10, generator=gen, dtype=f64)
    labels = torch.randint(0, 2, (1, 10, 10), generator=gen)
    out.append((
        "distribution",
        "TopK, `k=1` (nnU-Net's 1 %), M = 100 pixels",
        fmt(dynloss.TopKLoss(k=1, mode="multiclass")(logits, labels).item()),
        NA,
        NA,
        fmt(nnunet_topk(logits, labels, 1)),
        "dynloss's `k=1` keeps every pixel (the cross-entropy); nnU-Net's 1 % is `k=0.01` "
        f"here ({fmt(dynloss.TopKLoss(k=0.01, mode='multiclass')(logits, labels).item())})",
    ))

    # 9. Focal in binary mode with alpha and ignore_index: the same in all three.
    logits = torch.randn(2, 1, 8, 8, generator=gen, dtype=f64)
    target = (torch.rand(2, 1, 8, 8, generator=gen) > 0.5).to(f64)
    target[..., :3] = 255
    out.append((
        "distribution",
        "Focal, binary, `alpha=0.25`, `ignore_index=255` on 3 of 8 columns",
        fmt(dynloss.FocalLoss(alpha=0.25, ignore_index=255)(logits, target).item()),
        fmt(smp.losses.FocalLoss("binary", alpha=0.25, ignore_index=255)(logits,
                                                                          target).item()),
        fmt(MonaiFocalLoss(alpha=0.25, ignore_index=255)(logits, target).item()),
        NA,
        "the same loss: the mean over the kept pixels",
    ))

    # 10. Focal in multiclass mode: softmax here, sigmoids in smp, a mean over C in MONAI.
    logits = torch.randn(2, 4, 8, 8, generator=gen, dtype=f64)
    labels = torch.randint(0, 4, (2, 8, 8), generator=gen)
    one_hot = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).to(f64)
    multilabel = dynloss.FocalLoss(mode="multilabel")(logits, one_hot).item()
    out.append((
        "distribution",
        "Focal, multiclass, C = 4",
        fmt(dynloss.FocalLoss(mode="multiclass")(logits, labels).item()),
        fmt(smp.losses.FocalLoss("multiclass")(logits, labels).item()),
        fmt(MonaiFocalLoss(use_softmax=True, to_onehot_y=True)(logits,
                                                               labels.unsqueeze(1)).item()),
        NA,
        "dynloss: the softmax probability of the true class, a mean over pixels; smp: "
        f"sigmoid focal on each class of the one-hot target (dynloss's multilabel, "
        f"{fmt(multilabel)}); MONAI: softmax like dynloss but a mean over pixels and classes, "
        "the other classes adding 0 (dynloss's value / C)",
    ))
    return out


def render(family: str, all_rows: list[Row] | None = None) -> str:
    """The Markdown table of one family; a library column with no value in it is left out."""
    mine = [row[1:] for row in (rows() if all_rows is None else all_rows) if row[0] == family]
    shown = [i for i in range(len(LIBRARIES)) if any(row[1 + i] != NA for row in mine)]
    lines = [
        "<!-- Generated by docs/compare_table.py; do not edit. CI checks it is up to date. -->",
        "",
        "| case | " + " | ".join(LIBRARIES[i] for i in shown) + " | why |",
        "|---|" + "---:|" * len(shown) + "---|",
    ]
    for case, *values, why in mine:
        lines.append(f"| {case} | " + " | ".join(values[i] for i in shown) + f" | {why} |")
    lines += ["", NOTES[family], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the committed table differs from a fresh run")
    args = parser.parse_args(argv)
    all_rows = rows()
    texts = {family: render(family, all_rows) for family in FAMILIES}
    if args.check:
        stale = 0
        for family, text in texts.items():
            out = OUT[family]
            old = out.read_text() if out.exists() else ""
            if old != text:
                stale += 1
                sys.stdout.writelines(difflib.unified_diff(
                    old.splitlines(keepends=True), text.splitlines(keepends=True),
                    str(out), "fresh run"))
                print(f"\n{out} is out of date: run python docs/compare_table.py",
                      file=sys.stderr)
            else:
                print(f"{out.name} is up to date")
        return 1 if stale else 0
    GENERATED.mkdir(exist_ok=True)
    for family, text in texts.items():
        OUT[family].write_text(text)
        print(f"wrote {OUT[family]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
