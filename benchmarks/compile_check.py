"""Compile every Triton kernel variant for a GPU target without a GPU (a developer check).

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute but not that they
compile. This script intercepts each kernel launch made by the dynloss Triton autograd
Functions on CPU tensors, and instead of launching compiles the kernel ahead of time for
``--arch`` (default sm_90, an H100) down to a cubin with Triton's bundled ``ptxas``. Outputs of
the intercepted launches are left uninitialised; only compilation is checked.

Usage::

    PYTHONPATH=src python benchmarks/compile_check.py [--arch 90] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check.py needs TRITON_INTERPRET unset (it compiles, it does not interpret)")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dynloss.kernels import triton_pixel, triton_region
from dynloss.kernels.triton_fused import TritonRegionPixel
from dynloss.kernels.triton_pixel import TritonPixelLossSum
from dynloss.kernels.triton_region import TritonRegionSums

_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.float64: "fp64", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16",
    torch.int32: "i32", torch.int64: "i64", torch.bool: "i1",
}


class _Compiler:
    """Stands in for a ``JITFunction``: ``kernel[grid](*args, **kw)`` compiles, no launch."""

    def __init__(self, fn, target: GPUTarget, seen: dict):
        self.fn, self.target, self.seen = fn, target, seen

    def __getitem__(self, grid):
        return self._compile

    def _compile(self, *args, **kwargs):
        fn = self.fn.fn if hasattr(self.fn, "fn") and not hasattr(self.fn, "arg_names") else self.fn
        names = fn.arg_names
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        values = dict(zip(names, args, strict=False))
        values.update(kwargs)
        signature, constexprs = {}, {}
        for i, name in enumerate(names):
            value = values[name]
            if fn.params[i].is_constexpr:
                signature[name] = "constexpr"
                constexprs[name] = value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TYPES[value.dtype]
            elif isinstance(value, bool):
                signature[name] = "i1"
            elif isinstance(value, int):
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            elif isinstance(value, float):
                signature[name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
        key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))
        if key in self.seen:
            return
        start = time.perf_counter()
        triton.compile(ASTSource(fn, signature, constexprs), target=self.target, options=options)
        self.seen[key] = time.perf_counter() - start


def _exercise(x, t, mode, from_logits, ignore, gamma, alpha) -> None:
    """Forward and backward of every Triton autograd Function for one configuration."""
    sums = TritonRegionSums.apply(x, t, mode, from_logits, ignore)
    (sums[0].sum() + sums[1].sum()).backward()
    TritonPixelLossSum.apply(x, t, mode, from_logits, ignore, gamma, alpha, None)[0].backward()
    TritonPixelLossSum.apply(x, t, mode, from_logits, ignore, gamma, alpha, 0.6)[0].backward()
    fused = TritonRegionPixel.apply(x, t, mode, from_logits, ignore, gamma, alpha)
    (fused[0].sum() + fused[1].sum() + fused[3]).backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--quick", action="store_true", help="fewer dtype combinations")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    seen: dict = {}
    for module in (triton_region, triton_pixel):
        for name in dir(module):
            obj = getattr(module, name)
            if name.endswith("_kernel") and isinstance(obj, triton.runtime.jit.JITFunction):
                setattr(module, name, _Compiler(obj, target, seen))

    dtypes = [torch.float32, torch.bfloat16] if args.quick else [
        torch.float32, torch.float16, torch.bfloat16]
    failures = 0
    cases = itertools.product(
        ["binary", "multiclass"], dtypes, [True, False], [None, 255], [(0.0, None), (2.0, "a")]
    )
    for mode, dtype, from_logits, ignore, (gamma, alpha) in cases:
        c = 3 if mode == "multiclass" else 1
        x = torch.zeros(2, c, 40, dtype=dtype, requires_grad=True)
        if mode == "multiclass":
            t = torch.zeros(2, 40, dtype=torch.int64)
            a = (1.0, 2.0, 3.0) if alpha else None
        else:
            t = torch.zeros(2, 1, 40, dtype=torch.uint8)
            a = 0.25 if alpha else None
        try:
            _exercise(x, t, mode, from_logits, ignore, gamma, a)
        except Exception as exc:  # report and go on
            failures += 1
            root = exc
            while root.__cause__ is not None:
                root = root.__cause__
            print(f"FAIL {mode} {dtype} logits={from_logits} ignore={ignore} "
                  f"gamma={gamma} alpha={a}: {type(root).__name__}: {root}", flush=True)
    # other target dtypes (binary)
    for tdtype in (torch.float32, torch.bool, torch.int64, torch.float16):
        x = torch.zeros(2, 1, 40, requires_grad=True)
        t = torch.zeros(2, 1, 40, dtype=tdtype)
        TritonRegionPixel.apply(x, t, "binary", True, None, 2.0, None)[3].backward()
        TritonPixelLossSum.apply(x, t, "binary", True, None, 0.0, None, 0.5)[0].backward()
    total = sum(seen.values())
    print(f"compiled {len(seen)} kernel variants for sm_{args.arch} in {total:.1f} s; "
          f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
