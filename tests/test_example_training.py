"""examples/msd_colon end to end on a tiny phantom: a switching run, resume, skip, benchmark, DDP.

The model is the real smp U-Net with an EfficientNet-B0 encoder; only the image size (32x32),
the phantom and the number of epochs are shrunk so that this runs in seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import msd_colon
from msd_colon_lib import splits
from msd_colon_lib.data import build_slice_store
from msd_colon_lib.phantom import make_phantom
from msd_colon_lib.training import LAST, RunConfig, train_run
from tests import _example_helpers

TINY = ["--image-size", "32", "--phantom-patients", "4", "--phantom-size", "48",
        "--phantom-slices", "10", "12", "--batch-size", "8", "--device", "cpu", "--quiet",
        "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, thread spinning costs more than it gains."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom")
    data = make_phantom(root / "Task10_Colon", n_patients=4, shape=(48, 48), slices=(10, 12))
    return build_slice_store(data, root / "store", size=32, progress=False)


@pytest.fixture(scope="module")
def split(store):
    train, test = splits.train_test_split(store.patients, "patient", 0.25, seed=0)
    train, val = splits.subset_split(train, store.patients, 0.34, "patient", seed=1)
    return {"train": train, "val": val, "test": test}


def test_two_epoch_switching_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    args = ["--out", str(out), "--loss", "iou->bce@1", "--long-epochs", "2", *TINY]
    result = msd_colon.main(args)
    (spec, res), = result["results"]
    assert spec.loss == "iou->bce@1" and res["epochs"] == 2
    hist = res["history"]
    assert [h["stage"] for h in hist] == [0, 1]
    assert set(hist[0]["terms"]) != set(hist[1]["terms"])  # region term, then distribution term
    assert all(np.isfinite(h["train_loss"]) for h in hist)
    assert {"val_dice_slice", "val_dice_tumour", "val_dice_global", "val_dice_patient"} <= set(
        hist[0])
    run_dir = out / spec.name
    for name in ("config.json", "log.jsonl", "last.pt", "best.pt", "result.json"):
        assert (run_dir / name).exists(), name
    state = torch.load(run_dir / LAST, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "Table 3" in report and "iou->bce@1" in report
    assert "0.7882" in report  # the paper's number beside ours
    assert (out / "runs.csv").read_text().count("\n") == 2
    assert (out / "loss_curves.png").stat().st_size > 10_000
    assert (out / "qualitative.png").stat().st_size > 5_000
    # a finished run is skipped: no retraining, same result
    mtime = (run_dir / LAST).stat().st_mtime_ns
    again = msd_colon.main(args)
    assert (run_dir / LAST).stat().st_mtime_ns == mtime
    assert again["results"][0][1]["test"] == res["test"]


def _strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def test_resume_equals_uninterrupted(store, split, tmp_path):
    cfg = RunConfig(loss="iou->bce@1", epochs=3, batch_size=8, lr=1e-3, device="cpu")
    full = train_run(cfg, store, split, tmp_path / "full", progress=False)
    part = train_run(cfg, store, split, tmp_path / "part", progress=False, stop_after=2)
    assert part == {"interrupted_at_epoch": 2}
    assert not (tmp_path / "part" / "result.json").exists()
    resumed = train_run(cfg, store, split, tmp_path / "part", resume=True, progress=False)
    assert resumed["test"] == full["test"]
    assert _strip(resumed["history"]) == _strip(full["history"])
    a = torch.load(tmp_path / "full" / LAST, map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "part" / LAST, map_location="cpu", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["loss"]["_extra_state"] == b["loss"]["_extra_state"]
    assert a["loss"]["_extra_state"]["active_index"] == 1


def test_benchmark_mode_on_cpu(tmp_path):
    result = msd_colon.main(["--out", str(tmp_path), "--benchmark", "--benchmark-steps", "2",
                             "--loss", "iou->bce@1", *TINY])
    (row,) = result["rows"]
    assert all(np.isfinite(row[key]) for key in ("images_per_s", "step_ms", "loss_fwd_bwd_ms"))
    # the derived columns are the measured times' ratios
    assert row["images_per_s"] == pytest.approx(row["batch_size"] * 1e3 / row["step_ms"],
                                                rel=1e-12)
    assert row["loss_share_of_step"] == pytest.approx(row["loss_fwd_bwd_ms"] / row["step_ms"],
                                                      rel=1e-12)
    assert row["steps"] == 2
    assert json.loads((tmp_path / "benchmark.json").read_text())[0]["batch_size"] == 8
    assert "loss share" in (tmp_path / "benchmark.md").read_text()


def test_ddp_two_process_gloo_smoke(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(_example_helpers.EXAMPLES.parent / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(_example_helpers.EXAMPLES / "msd_colon.py"), "--out", str(out),
           "--loss", "iou->bce@1", "--long-epochs", "2", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(next(out.glob("table3/*/seed0/result.json")).read_text())
    assert result["world_size"] == 2
    assert [h["stage"] for h in result["history"]] == [0, 1]
    assert (out / "report.md").exists()


def test_precise_bn_recomputes_population_statistics():
    from msd_colon_lib.training import recalibrate_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=0.01),
                                torch.nn.Dropout(0.5), torch.nn.Conv2d(4, 1, 1))
    x = torch.randn(12, 3, 5, 5) * 3 + 1
    data = [(x[i : i + 4], torch.zeros(4, 1, 5, 5), torch.arange(4)) for i in range(0, 12, 4)]
    rng = torch.get_rng_state()
    recalibrate_bn(model, data, device=torch.device("cpu"), autocast_dtype=None,
                   channels_last=False)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    with torch.no_grad():
        h = model[0](x)
    torch.testing.assert_close(model[1].running_mean, h.mean((0, 2, 3)))
    # momentum=None: the plain average of the per-batch (unbiased) variances
    per_batch = torch.stack([h[i : i + 4].var((0, 2, 3), unbiased=True) for i in (0, 4, 8)])
    torch.testing.assert_close(model[1].running_var, per_batch.mean(0))
    assert model[1].momentum == 0.01 and model.training


def test_paper_preset_plans_the_papers_grid():
    out = msd_colon.main(["--preset", "paper", "--dry-run"])
    grid, args = out["plan"], out["args"]
    assert (args.image_size, args.batch_size, args.lr) == (256, 32, 1e-4)
    tables = [spec.table for spec in grid]
    assert tables.count("table1") == 6 * 3 and tables.count("table2") == 4 * 3
    assert tables.count("table3") == 9 * 3 and tables.count("table4") == 4 * 5 * 2
    assert {s.epochs for s in grid if s.table == "table1"} == {50}
    assert {s.epochs for s in grid if s.table != "table1"} == {100}
    assert {s.loss for s in grid if s.table == "table3"} >= {"iou->bce@50", "tversky->topk@50"}
    assert len({s.name for s in grid}) == len(grid)  # every run has its own folder


def test_default_is_the_scaled_down_demo_grid():
    grid = msd_colon.main(["--dry-run"])["plan"]
    assert [s.loss for s in grid] == ["iou", "bce", "iou+bce", "iou->bce@3"]


def test_encoder_weights_from_a_local_file(tmp_path):
    from msd_colon_lib.training import build_model

    torch.manual_seed(1)
    source = build_model()
    path = tmp_path / "encoder.pt"
    torch.save(source.encoder.state_dict(), path)
    torch.manual_seed(2)
    model = build_model(encoder_weights=str(path))
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(value, model.encoder.state_dict()[key]), key
    assert not model.encoder._conv_head.weight.requires_grad  # unused by the U-Net: frozen
