"""The native kernels' buffer pool (kernels/buffer_pool.py): a saved buffer is reused once
nothing refers to it, never while something does, and the pool stays within its bounds."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dynloss
from dynloss.kernels import native_available
from dynloss.kernels.native import buffer_pool
from dynloss.kernels.native.buffer_pool import POOL, BufferPool, pool_enabled

pytestmark = pytest.mark.skipif(not native_available(), reason="native kernels unavailable")


def _inputs(seed: int = 0, size: int = 256):
    """(4, 1, 256, 256) float32: 1 MiB, the smallest buffer the pool keeps."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, size, size, generator=gen), (torch.rand(4, 1, size, size,
                                                                       generator=gen)
                                                       > 0.7).float()


def _gradient(loss_fn, logits, target):
    x = logits.detach().clone().requires_grad_(True)
    loss_fn(x, target).backward()
    return x.grad


@pytest.fixture(autouse=True)
def _fresh_pool(monkeypatch):
    monkeypatch.setattr(buffer_pool, "ENABLED", True)
    POOL.clear()
    yield
    POOL.clear()


def test_buffer_is_reused_once_its_gradient_is_dropped():
    logits, target = _inputs()
    dice = dynloss.DiceLoss(backend="native")
    first = _gradient(dice, logits, target)
    address = first.data_ptr()
    expected = first.clone()
    del first  # the gradient was consumed: its storage is free again
    second = _gradient(dice, logits, target)
    assert second.data_ptr() == address
    assert torch.equal(second, expected)
    assert len(POOL) == 1


def test_buffer_in_use_is_never_handed_out():
    logits, target = _inputs()
    dice = dynloss.DiceLoss(backend="native")
    kept = _gradient(dice, logits, target)
    snapshot = kept.clone()
    other_logits, other_target = _inputs(seed=1)
    other = _gradient(dice, other_logits, other_target)  # same shape, while `kept` lives
    assert other.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, snapshot)  # untouched by the second step
    want = _gradient(dynloss.DiceLoss(backend="reference"), other_logits, other_target)
    torch.testing.assert_close(other, want, rtol=1e-4, atol=1e-9)


def test_graph_kept_alive_keeps_its_buffer():
    logits, target = _inputs()
    x = logits.detach().clone().requires_grad_(True)
    pending = dynloss.DiceLoss(backend="native")(x, target)  # not yet backpropagated
    grad = _gradient(dynloss.DiceLoss(backend="native"), logits, target)
    pending.backward()
    torch.testing.assert_close(x.grad, grad)
    assert x.grad.data_ptr() != grad.data_ptr()


def test_composite_gets_two_distinct_buffers():
    from dynloss.kernels import region_pixel_loss

    logits, target = _inputs()
    x = logits.detach().clone().requires_grad_(True)
    saved = set()

    def pack(t):
        if t.numel() == x.numel() and t.dtype == torch.float32:
            saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = region_pixel_loss(x, target, region="dice", pixel="bce", backend="native")
    saved -= {x.untyped_storage().data_ptr(), target.untyped_storage().data_ptr()}
    assert len(saved) == 2  # probabilities' slopes and the cross-entropy slopes
    loss.backward()
    want = _gradient(lambda a, b: region_pixel_loss(a, b, backend="reference"), logits, target)
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-9)


def test_pool_bounds():
    pool = BufferPool(max_buffers=2, max_bytes=10_000)
    kept = [pool.empty((n,)) for n in (100, 200, 300)]  # all in use: three allocations
    assert len(pool) == 2
    assert pool.empty((5_000,)).numel() == 5_000  # over max_bytes: not pooled at all
    assert len(pool) == 2
    del kept


def test_the_least_recently_used_buffer_is_the_one_released():
    """The module's promise: beyond ``max_buffers`` the least recently used buffers go back
    to the allocator, and the ones used last stay for the next step."""
    pool = BufferPool(max_buffers=2, max_bytes=10**6)
    for n in (1000, 2000, 3000):
        pool.empty((n,))  # each dropped at once: free again
    assert sorted(entry[0].numel() for entry in pool._entries) == [2000, 3000]
    assert pool.empty((2000,)).numel() == 2000  # taken from the pool: the most recent
    pool.empty((4000,))
    assert sorted(entry[0].numel() for entry in pool._entries) == [2000, 4000]


def test_disabled_by_environment(monkeypatch):
    """``DYNLOSS_NATIVE_POOL=0`` is read when dynloss is imported (a fresh process), and
    then no buffer is pooled."""
    code = ("import dynloss.kernels.native.buffer_pool as b\n"
            "print(b.ENABLED, b.pool_enabled())\n")
    for value, want in (("0", "False False"), ("off", "False False"), ("1", "True True")):
        env = {**os.environ, "DYNLOSS_NATIVE_POOL": value}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.stdout.strip() == want, result.stderr
    monkeypatch.setattr(buffer_pool, "ENABLED", False)
    assert not pool_enabled()
    logits, target = _inputs()
    _gradient(dynloss.DiceLoss(backend="native"), logits, target)
    assert len(POOL) == 0


def test_the_pool_switch_takes_dynloss_natives_words_and_says_an_unknown_one(tmp_path):
    """``DYNLOSS_NATIVE_POOL=none``/``disabled`` (off for DYNLOSS_NATIVE) and a typo ``of``
    silently left the pool on. Found by a review of the environment variables."""
    script = tmp_path / "train.py"  # the warning points at the user's import, not into dynloss
    script.write_text("import warnings; warnings.simplefilter('always')\n"
                      "import dynloss.kernels.native.buffer_pool as b\nprint(b.ENABLED)\n")
    for value, want, said in (("none", "False", False), ("disabled", "False", False),
                              ("enabled", "True", False), ("of", "True", True)):
        env = {**os.environ, "DYNLOSS_NATIVE_POOL": value}
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                env=env, timeout=300)
        assert result.stdout.strip() == want, result.stderr
        line = (f"{script}:2: RuntimeWarning: dynloss: DYNLOSS_NATIVE_POOL={value!r} is neither "
                "on (1, true, on, yes, enable, enabled) nor off (0, false, off, no, none, "
                "disable, disabled): the buffer pool stays on")
        assert (line in result.stderr) == said, result.stderr
    script.write_text("import importlib, warnings; warnings.simplefilter('always')\n"
                      "importlib.import_module('dynloss')\n")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env={**os.environ, "DYNLOSS_NATIVE_POOL": "of"}, timeout=300)
    assert f"{script}:2: RuntimeWarning: dynloss: DYNLOSS_NATIVE_POOL='of'" in result.stderr, (
        result.stderr)


def test_small_buffers_are_allocated_afresh():
    """Below MIN_BYTES a buffer is not pooled: the allocator serves it from memory it keeps,
    and a fresh one costs less than a look-up in the pool."""
    assert buffer_pool.MIN_BYTES == 2**20 and POOL.min_bytes == buffer_pool.MIN_BYTES
    logits, target = _inputs(size=64)  # 64 KiB
    dice = dynloss.DiceLoss(backend="native")
    first = _gradient(dice, logits, target)
    assert len(POOL) == 0
    torch.testing.assert_close(first, _gradient(dynloss.DiceLoss(backend="reference"), logits,
                                                target), rtol=1e-4, atol=1e-9)
    big_logits, big_target = _inputs(size=256)
    _gradient(dice, big_logits, big_target)
    assert len(POOL) == 1


def test_a_kept_storage_object_keeps_its_buffer():
    """``x.grad.untyped_storage()`` is the pool's own storage object: keeping it alone added no
    count to the storage, so the next call wrote its gradient into it."""
    logits, target = _inputs()
    dice = dynloss.DiceLoss(backend="native")
    first = _gradient(dice, logits, target)
    storage = first.untyped_storage()
    snapshot = first.clone()
    del first
    second = _gradient(dice, logits * 2, target)
    assert second.untyped_storage().data_ptr() != storage.data_ptr()
    kept = torch.empty(0).set_(storage, 0, snapshot.shape)
    assert torch.equal(kept, snapshot)


def test_a_kept_base_tensor_keeps_its_buffer():
    """A gradient is a view of the pool's own flat tensor (``x.grad._base``): keeping that
    tensor alone added no count to the storage nor to its object, so the next call wrote its
    gradient into it. Found by a review."""
    logits, target = _inputs()
    dice = dynloss.DiceLoss(backend="native")
    x = logits.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(dice(x, target), x)
    base = first._base
    assert base.shape == (first.numel(),)  # the pool's own flat tensor
    snapshot = base.clone()
    del first
    second = _gradient(dice, logits * 2, target)
    assert second.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert torch.equal(base, snapshot)
    del base, second  # then it is free again
    third = _gradient(dice, logits, target)
    assert len(POOL) == 2 and torch.equal(third.view(-1), snapshot)


def test_a_buffer_moved_to_shared_memory_is_never_handed_out_again():
    """A gradient sent to another process (a ``torch.multiprocessing`` queue moves its storage
    to shared memory): the other process's hold is not counted here, so such a buffer leaves
    the pool (the receiver's tensor was overwritten by the next training step)."""
    logits, target = _inputs()
    dice = dynloss.DiceLoss(backend="native")
    first = _gradient(dice, logits, target)
    first.share_memory_()
    address = first.data_ptr()
    del first
    second = _gradient(dice, logits, target)
    assert second.data_ptr() != address


@pytest.mark.parametrize("size", [0, 64], ids=["freed", "shrunk"])
def test_a_buffer_whose_storage_was_resized_is_never_handed_out(size):
    """Code that frees a gradient's memory in place (FSDP/ZeRO-style: ``resize_(0)``) left a
    pooled buffer of the right element count over no memory: the next forward wrote 1 MiB
    into 64 bytes, or backward read a null pointer (a crash)."""
    logits, target = _inputs()
    dice = dynloss.DiceLoss(backend="native")
    expected = _gradient(dice, logits, target).clone()
    gradient = _gradient(dice, logits, target)
    gradient.untyped_storage().resize_(size)
    del gradient
    again = _gradient(dice, logits, target)
    assert torch.equal(again, expected)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("loss", ["dice", "bce", "composite"])
def test_a_forward_without_gradient_takes_no_buffer(mode, loss):
    """Under no_grad/inference_mode an input that requires grad still had its slopes written
    into a pooled input-sized buffer, thrown away (the docs: validation needs none)."""
    logits, target = _inputs()
    make = {"dice": lambda: dynloss.DiceLoss(backend="native"),
            "bce": lambda: dynloss.BCELoss(backend="native"),
            "composite": lambda: dynloss.CompositeLoss([dynloss.DiceLoss(backend="native"),
                                                        dynloss.BCELoss(backend="native")])}
    x = logits.clone().requires_grad_(True)
    with getattr(torch, mode)():
        value = make[loss]()(x, target)
    assert len(POOL) == 0
    assert torch.equal(value, make[loss]()(logits, target))



@pytest.mark.parametrize("loss", ["topk", "composite-topk", "dice-after-topk"])
def test_a_validation_under_inference_mode_leaves_the_pool_usable_for_training(loss):
    """TopK's scratch buffer, taken from the pool under inference_mode (Lightning's sanity
    check), was an inference tensor that the pool kept and handed to every later training
    call of that size: "Inference tensors cannot be saved for backward", at every step.
    Found by a review of training loops."""
    logits, target = _inputs()
    make = {"topk": lambda: dynloss.TopKLoss(backend="native"),
            "composite-topk": lambda: dynloss.CompositeLoss(
                [dynloss.IoULoss(backend="native"), dynloss.TopKLoss(backend="native")]),
            "dice-after-topk": lambda: dynloss.DiceLoss(backend="native")}
    with torch.inference_mode():
        dynloss.TopKLoss(backend="native")(logits, target)
    reference = {"topk": dynloss.TopKLoss(backend="reference"),
                 "composite-topk": dynloss.CompositeLoss(
                     [dynloss.IoULoss(backend="reference"),
                      dynloss.TopKLoss(backend="reference")]),
                 "dice-after-topk": dynloss.DiceLoss(backend="reference")}[loss]
    for _ in range(2):
        got = _gradient(make[loss](), logits, target)
        torch.testing.assert_close(got, _gradient(reference, logits, target),
                                   rtol=1e-4, atol=1e-9)


def _runs_in_a_fork(child) -> int:
    """Fork, run ``child`` there (exit 0 if it returns), and return the child's exit status;
    a child still running after 30 s is killed (-9)."""
    import time

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            torch.set_num_threads(1)  # (torch's own OpenMP team does not survive a fork)
            child()
            os._exit(0)
        except BaseException:
            os._exit(1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -9


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_while_another_thread_holds_the_pools_lock_does_not_deadlock():
    """A thread inside ``POOL.empty`` (which releases the GIL in torch.empty) when another
    forked left the child's copy of the lock held for ever: its first loss call hung."""
    logits, target = _inputs()
    dynloss.DiceLoss(backend="native")(logits, target)  # the kernels loaded in the parent
    with POOL._lock:  # what the other thread holds at the fork
        status = _runs_in_a_fork(
            lambda: _gradient(dynloss.DiceLoss(backend="native"), logits, target))
    assert status == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_while_another_thread_loads_the_kernels_does_not_deadlock(monkeypatch):
    from dynloss.kernels.native import build

    logits, target = _inputs()
    dynloss.DiceLoss(backend="native")(logits, target)
    monkeypatch.setattr(build, "_status", None)  # the parent's other thread is loading them
    with build._lock:
        status = _runs_in_a_fork(lambda: build.library())
    assert status == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_the_fork_warning_points_at_the_users_line():
    """It pointed into dynloss (``kernels/native/__init__.py``), a fixed stacklevel."""
    import warnings

    logits, target = _inputs()
    dynloss.DiceLoss(backend="native")(logits, target)

    def child():
        from dynloss.kernels.native import ffi

        ffi._forked_warned = False
        # two threads asked for, one running (torch's own team does not survive a fork)
        torch.get_num_threads = lambda: 2
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dynloss.DiceLoss(backend="native")(logits, target)
        files = [w.filename for w in caught if "was forked" in str(w.message)]
        assert files == [__file__], files

    assert _runs_in_a_fork(child) == 0


def test_nbytes_counts_the_buffers_the_pool_keeps():
    pool = BufferPool(max_buffers=4, max_bytes=2**30)
    assert pool.nbytes() == 0
    first = pool.empty((2, 300))
    pool.empty((1000,))
    assert pool.nbytes() == ((600 + 1000) * 4 if pool_enabled() else 0)
    del first
    pool.clear()
    assert pool.nbytes() == 0
