"""The C ABI of ``native_cpu.cpp``: the argument struct, its enums and the version.

:class:`Args` mirrors ``struct Args`` field for field; :data:`ABI_VERSION` must equal what
``dynloss_abi_version()`` returns (bumped with every change of the struct), so that a stale
cached library is never called with a struct it does not expect.

>>> from dynloss.kernels.native.abi import ABI_VERSION, TARGET_TYPES, Args
>>> import ctypes, torch
>>> ABI_VERSION, TARGET_TYPES[torch.int64], ctypes.sizeof(Args) % 8
(13, 2, 0)
"""

from __future__ import annotations

import ctypes

import torch

__all__ = ["ABI_VERSION", "FUNCTIONS", "PIXEL_BCE", "PIXEL_FOCAL", "PIXEL_FOCAL2",
           "PIXEL_NONE", "REAL_DTYPES", "REAL_TYPES", "TARGET_TYPES", "Args"]

ABI_VERSION = 13

PIXEL_NONE, PIXEL_BCE, PIXEL_FOCAL2, PIXEL_FOCAL = 0, 1, 2, 3
"""``Args.pixel``: no distribution term, BCE, focal with gamma = 2, focal with any gamma."""

TARGET_TYPES = {torch.float32: 0, torch.uint8: 1, torch.bool: 1, torch.int64: 2,
                torch.float64: 3}
"""Target dtypes the kernels read as they are (bool as uint8); others are converted. A
floating-point target has the type the input is computed in (float32 with float32 input,
float64 with float64 input)."""

REAL_TYPES = {torch.float32: 0, torch.float64: 1}
REAL_DTYPES = {code: dtype for dtype, code in REAL_TYPES.items()}
"""``Args.real``: the type the kernels compute in, of the input and of every buffer of its
elements (saved slopes, gradient, per-element losses) and of per-class or per-channel
values (class weights, ``pos_weight``, the gradients of the region sums); ``REAL_DTYPES``
reads it back."""

FUNCTIONS = ("dynloss_binary_forward", "dynloss_binary_backward",
             "dynloss_multiclass_forward", "dynloss_multiclass_backward",
             "dynloss_binary_topk", "dynloss_multiclass_topk")
"""The kernels' entry points: ``int f(const Args*)``, 0 ok, 1 out of memory, 2 bad args.
``*_topk`` select ``Args.topk`` of the losses a forward pass saved in ``Args.loss``."""


class Args(ctypes.Structure):
    """Mirror of ``struct Args`` in ``native_cpu.cpp`` (same order, same types)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("target", ctypes.c_void_p),
        ("target_type", ctypes.c_int64),
        ("n", ctypes.c_int64),
        ("c", ctypes.c_int64),
        ("m", ctypes.c_int64),
        ("logits", ctypes.c_int64),
        ("has_ignore", ctypes.c_int64),
        ("ignore_index", ctypes.c_int64),
        ("want_region", ctypes.c_int64),
        ("pixel", ctypes.c_int64),
        ("has_alpha", ctypes.c_int64),
        ("gamma", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("class_alpha", ctypes.c_void_p),
        ("threads", ctypes.c_int64),
        ("probabilities", ctypes.c_void_p),
        ("slope", ctypes.c_void_p),
        ("grad_intersection", ctypes.c_void_p),
        ("grad_prediction", ctypes.c_void_p),
        ("grad_pixel", ctypes.c_double),
        ("grad", ctypes.c_void_p),
        ("region", ctypes.c_void_p),
        ("pixel_out", ctypes.c_void_p),
        ("check", ctypes.c_void_p),
        ("hard_targets", ctypes.c_int64),
        ("loss", ctypes.c_void_p),
        ("topk", ctypes.c_int64),
        ("region_scale", ctypes.c_double),
        ("pooled", ctypes.c_int64),
        ("portable_loops", ctypes.c_int64),
        ("pos_weight", ctypes.c_void_p),
        ("weighted_count", ctypes.c_int64),
        ("ignored_loss", ctypes.c_double),
        ("real", ctypes.c_int64),
        ("zero_unselected", ctypes.c_int64),
    ]
