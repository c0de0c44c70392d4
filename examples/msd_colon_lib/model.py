"""The model and the loss of a run: smp U-Net (EfficientNet-B0), dynloss losses, precise BN."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping

import torch
from torch.utils.data import DataLoader

from .errors import WeightsError, first_line


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
        raise WeightsError(
            f"could not load {weights!r} weights for {encoder} ({first_line(error)}). "
            "Without network access, pass --encoder-weights none (train from scratch) or "
            "--encoder-weights PATH to an encoder state_dict saved where the download works."
        ) from error
    if is_path:
        _load_encoder_state(model.encoder, weights, encoder)
    # smp's EfficientNet encoder keeps the classifier's head conv and BN, which the U-Net never
    # uses; freezing them changes nothing in training and lets DDP run without
    # find_unused_parameters.
    for name in ("_conv_head", "_bn1"):
        module = getattr(model.encoder, name, None)
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    return model


def _load_encoder_state(module: torch.nn.Module, path: str, encoder: str) -> None:
    """Load the encoder ``state_dict`` file ``path`` into ``module``; anything else in the file
    (a whole pickled module, an empty file, a tensor, another model's weights) is a
    :class:`WeightsError` naming it."""
    def refuse(reason: str) -> WeightsError:
        return WeightsError(f"--encoder-weights {path}: not an {encoder} encoder state_dict "
                            f"({reason})")

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" not in str(error).lower():
            raise refuse(first_line(error)) from error
        raise refuse("it holds pickled objects other than tensors, such as a whole module saved "
                     "by torch.save(model, path); save model.encoder.state_dict() instead"
                     ) from error
    except EOFError as error:
        empty = os.path.getsize(path) == 0
        raise refuse("the file is empty" if empty else "the file is truncated") from error
    except (OSError, RuntimeError, ValueError, LookupError, TypeError, AttributeError) as error:
        # (torch's unpickler meets a text file, say, with an IndexError or a KeyError)
        saved = zipfile.is_zipfile(path)
        raise refuse(first_line(error) if saved else "not a file saved by torch.save"
                     ) from error
    if not isinstance(state, Mapping):
        raise refuse(f"it holds a {type(state).__name__}, not a state_dict of parameter names "
                     "and tensors")
    own = module.state_dict()
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    if missing or unexpected:
        raise refuse(f"its keys are another model's: {len(missing)} of the encoder's are "
                     f"missing{_example(missing)} and {len(unexpected)} are not the "
                     f"encoder's{_example(unexpected)}")
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
        # torch's message opens with "Error(s) in loading state_dict for ...:", then the
        # mismatches (a parameter's shape, say): the first of those says what is wrong
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        raise refuse(details[0] if details else first_line(error)) from error


def _example(keys: list[str]) -> str:
    return f" (e.g. {keys[0]!r})" if keys else ""


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


