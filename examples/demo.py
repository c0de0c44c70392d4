"""A one-minute tour of dynloss: train a tiny network on synthetic blobs with each loss.

    python examples/demo.py

Each of the six losses trains the same small fully convolutional network for a few steps on
random discs (about 6 % of the pixels foreground); then a composite and a
switching loss (region loss first, distribution loss after) do the same. It prints each
run's first and last loss and the Dice of its predictions on held-out blobs. Everything is
synthetic and seeded; it runs on a CPU in well under a minute.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dynloss import LOSSES, build_loss


def blobs(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with one bright noisy disc each, and their masks ``(n, 1, size, size)``."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand(n, 2, generator=gen) * (size - 12) + 6
    radii = torch.rand(n, generator=gen) * 3 + 3
    dist = (yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2
    masks = (dist < radii[:, None, None] ** 2).float().unsqueeze(1)
    images = masks * 0.8 + torch.randn(n, 1, size, size, generator=gen) * 0.35
    return images, masks


def tiny_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(16, 1, 1),
    )


def dice_score(logits: torch.Tensor, masks: torch.Tensor) -> float:
    pred = (logits > 0).float()
    return (2 * (pred * masks).sum() / (pred.sum() + masks.sum()).clamp_min(1)).item()


def train(loss_fn: nn.Module, epochs: int = 6, steps: int = 8) -> tuple[float, float, float]:
    torch.manual_seed(0)
    model = tiny_net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images, masks = blobs(64, seed=1)
    losses = []
    for _epoch in range(epochs):
        for step in range(steps):
            batch = slice(step * 8, step * 8 + 8)
            loss = loss_fn(model(images[batch]), masks[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if hasattr(loss_fn, "step"):
            loss_fn.step()  # SwitchingLoss / scheduled CompositeLoss: once per epoch
    test_images, test_masks = blobs(32, seed=2)
    with torch.no_grad():
        return losses[0], losses[-1], dice_score(model(test_images), test_masks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    parser.add_argument("--steps", type=int, default=8, choices=range(1, 9), metavar="1..8",
                        help="batches of 8 blobs per epoch (default 8)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the switching run switches at epochs // 2); got "
                     f"{args.epochs}")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    switch = args.epochs // 2
    runs = {name: LOSSES[name]() for name in ("bce", "focal", "topk", "dice", "iou", "tversky")}
    runs["dice+focal"] = build_loss("dice+focal")
    runs[f"iou->bce@{switch}"] = build_loss(f"iou->bce@{switch}")
    print(f"synthetic blobs, tiny CNN, {args.epochs} epochs x {args.steps} steps (data are "
          "random discs, not CT)")
    print(f"{'loss':12s} {'first':>8s} {'last':>8s} {'test Dice':>10s}")
    for name, loss_fn in runs.items():
        first, last, dice = train(loss_fn, args.epochs, args.steps)
        print(f"{name:12s} {first:8.4f} {last:8.4f} {dice:10.3f}")


if __name__ == "__main__":
    main()
