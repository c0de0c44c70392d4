"""examples/msd_colon end to end on a tiny phantom: a switching run, resume, reuse, benchmark, DDP,
the LR at the switch, the fingerprint of a run.

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
from msd_colon_lib.errors import MismatchError
from msd_colon_lib.phantom import make_phantom
from msd_colon_lib.training import BEST, LAST, RunConfig, run_fingerprint, train_run
from tests import _example_helpers

from ._example_helpers import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_two_epoch_switching_run_end_to_end(tmp_path, monkeypatch):
    import matplotlib.figure
    import matplotlib.image

    figures = {}  # what each saved PNG shows, captured as it is saved
    save = matplotlib.figure.Figure.savefig

    def capture(self, path, *args, **kwargs):
        figures[os.path.basename(str(path))] = self
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
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
    # the loss curves plot this run's terms: IoU in epoch 1 (top, linear), BCE in epoch 2
    # (bottom), the switch between them, and the validation Dice
    curves = figures["loss_curves.png"]
    top, validation, bottom = curves.axes[0], curves.axes[1], curves.axes[2]
    assert top.get_title() == "iou->bce@1"
    lines = {line.get_label(): line for ax in (top, bottom) for line in ax.lines}
    np.testing.assert_allclose(lines["iou"].get_ydata(), [hist[0]["terms"]["iou"], np.nan])
    np.testing.assert_allclose(lines["bce"].get_ydata(), [np.nan, hist[1]["terms"]["bce"]])
    assert bottom.get_yscale() == "log"
    assert [line.get_xdata()[0] for line in top.lines if line.get_label() == "switch"] == [1.5]
    (dice_line,) = validation.lines
    np.testing.assert_allclose(dice_line.get_ydata(), [h["val_dice_global"] for h in hist])
    # the PNG is that figure at 110 dpi
    height, width = matplotlib.image.imread(out / "loss_curves.png").shape[:2]
    assert (width, height) == tuple(round(v * 110) for v in curves.get_size_inches())
    # the qualitative figure: image, ground truth, then this run's prediction with its Dice
    qualitative = figures["qualitative.png"]
    titles = [ax.get_title() for ax in qualitative.axes]
    assert titles[:2] == ["image", "ground truth"] and len(titles) == 3
    assert titles[2].startswith("iou->bce@1\nDice ")
    height, width = matplotlib.image.imread(out / "qualitative.png").shape[:2]
    assert (width, height) == tuple(round(v * 110) for v in qualitative.get_size_inches())
    # the report says how the qualitative slice was chosen
    from msd_colon_lib.runner import qualitative_slice

    store = result["store"]
    _, test = splits.train_test_split(store.patients, "patient", 0.2, seed=0)  # the defaults
    assert len(test) == res["n_test"]
    k = qualitative_slice(store, test)
    assert store.meta["tumour_pixels"][k] == max(store.meta["tumour_pixels"][i] for i in test)
    assert (f"The qualitative slice is test slice {k} "
            f"({store.patient_names[store.patients[k]]}): of the {res['n_test']} test slices, "
            f"the one with the most tumour pixels in the ground truth "
            f"({store.meta['tumour_pixels'][k]} at the stored size). It is chosen from the labels "
            "alone") in report
    assert "- preset: `demo` (the default for the synthetic phantom)" in report
    assert "- LR at the switch (--switch-lr): **keep**" in report
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
    result = json.loads(next(out.glob("runs/*/*/seed0/result.json")).read_text())
    assert result["world_size"] == 2
    assert [h["stage"] for h in result["history"]] == [0, 1]
    report = (out / "report.md").read_text()
    assert "SYNTHETIC" in report and "iou->bce@1" in report


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
    # smp's default encoder weights, which the paper kept; no validation set (the paper names a
    # train/test split only), so the plateau scheduler watches the training loss; no LR restart
    assert (args.encoder_weights, args.val_fraction, args.monitor) == ("imagenet", 0.0,
                                                                       "train_loss")
    assert args.switch_lr == "keep" and args.experiment == ["paper"]
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


def test_real_data_without_preset_uses_the_paper_preset(tmp_path):
    args = msd_colon.main(["--data-dir", str(tmp_path), "--dry-run"])["args"]
    assert (args.preset, args.preset_reason) == ("paper", "the default for real data")
    assert (args.image_size, args.epochs, args.long_epochs) == (256, 50, 100)
    args = msd_colon.main(["--dry-run"])["args"]
    assert (args.preset, args.preset_reason) == ("demo", "the default for the synthetic phantom")
    args = msd_colon.main(["--data-dir", str(tmp_path), "--preset", "demo", "--dry-run"])["args"]
    assert (args.preset, args.preset_reason, args.image_size) == ("demo", "--preset", 64)


# ----------------------------------------------------------------------------- LR at the switch

# A plateau scheduler that reduces the LR after *every* epoch: it watches the training loss
# with a relative threshold of 1 (an improvement would need a loss below 0), patience 0.
REDUCING = {"monitor": "train_loss", "plateau_patience": 0, "plateau_threshold": 1.0,
            "batch_size": 8, "lr": 1e-3, "device": "cpu"}


def _lrs(result):
    return [h["lr"] for h in result["history"]]


def test_resume_before_the_switch_equals_uninterrupted(store, split, tmp_path):
    """Interrupted after epoch 1, before the switch at 2, with an LR restart at the switch and a
    scheduler that reduces the LR every epoch: the resumed run must restart the LR at the switch
    (the optimizer's parameter groups were replaced on resume) and end exactly like the
    uninterrupted run -- history, weights, scheduler, best value, best.pt."""
    cfg = RunConfig(loss="iou->bce@2", epochs=4, switch_lr="restart", **REDUCING)
    full = train_run(cfg, store, split, tmp_path / "full", progress=False, log=None)
    assert _lrs(full) == pytest.approx([1e-3, 1e-4, 1e-3, 1e-4])  # restarted at the switch
    assert full["lr_restarts"] == [2] and full["switches"] == [[0, 1, 2]]
    part = train_run(cfg, store, split, tmp_path / "part", progress=False, stop_after=1)
    assert part == {"interrupted_at_epoch": 1}
    resumed = train_run(cfg, store, split, tmp_path / "part", resume=True, progress=False)
    assert _strip(resumed["history"]) == _strip(full["history"])
    assert resumed["test"] == full["test"]
    assert (resumed["best_val"], resumed["best_epoch"], resumed["lr_restarts"]) == (
        full["best_val"], full["best_epoch"], full["lr_restarts"])
    a = torch.load(tmp_path / "full" / LAST, map_location="cpu", weights_only=True)
    b = torch.load(tmp_path / "part" / LAST, map_location="cpu", weights_only=True)
    assert a["scheduler"] == b["scheduler"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    best_a = torch.load(tmp_path / "full" / BEST, map_location="cpu", weights_only=True)
    best_b = torch.load(tmp_path / "part" / BEST, map_location="cpu", weights_only=True)
    assert best_a["epoch"] == best_b["epoch"] == full["best_epoch"]
    for key, value in best_a["model"].items():
        assert torch.equal(value, best_b["model"][key]), key


def test_switch_lr_is_applied_the_same_way_to_every_arm(store, split, tmp_path):
    """keep: no arm touches the LR at the switch; restart: the switching run at its switch and
    the single/composite runs at the same epoch (restart_at) -- the same LR sequence in all."""
    lrs = {}
    for loss in ("iou", "iou+bce", "iou->bce@2"):
        for mode in ("keep", "restart"):
            restart_at = 2 if mode == "restart" and "->" not in loss else None
            cfg = RunConfig(loss=loss, epochs=3, switch_lr=mode, restart_at=restart_at,
                            **REDUCING)
            res = train_run(cfg, store, split, tmp_path / f"{loss}-{mode}", progress=False)
            lrs[loss, mode] = _lrs(res)
            assert res["lr_restarts"] == ([2] if mode == "restart" else [])
    for loss in ("iou", "iou+bce", "iou->bce@2"):
        assert lrs[loss, "keep"] == pytest.approx([1e-3, 1e-4, 1e-5])
        assert lrs[loss, "restart"] == pytest.approx([1e-3, 1e-4, 1e-3])


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("what", ["checkpoint", "text"])
def test_a_full_disk_while_saving_is_an_oserror_naming_the_file(tmp_path, what):
    """A full disk while last.pt was written came out of torch's writer as
    "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 2782784 vs
    2782680"; it is ENOSPC naming the file, which the command line reports in one line, and
    no partial file is left. (/dev/full answers every write with ENOSPC.) Found by a review."""
    import errno

    from msd_colon_lib.training import atomic_save, atomic_write_text

    path = tmp_path / LAST
    (tmp_path / f".{LAST}.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError) as caught:
        if what == "checkpoint":
            atomic_save({"weight": torch.zeros(100_000)}, path)
        else:
            atomic_write_text(path, "x" * 100_000)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_repair_best_after_a_crash_between_last_and_best(tmp_path):
    from msd_colon_lib.training import _repair_best

    model = torch.nn.Linear(2, 1)
    stale = {"epoch": 1, "model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
             "dice_global": 0.1}
    torch.save(stale, tmp_path / BEST)
    state = {"epoch": 2, "best_epoch": 2, "best": 0.5, "model": model.state_dict()}
    _repair_best(tmp_path, state, "dice_global")
    best = torch.load(tmp_path / BEST, weights_only=True)
    assert best["epoch"] == 2 and best["dice_global"] == 0.5
    assert torch.equal(best["model"]["weight"], model.weight.detach())
    torch.save(stale, tmp_path / BEST)
    with pytest.raises(MismatchError, match=r"holds epoch 1, last\.pt says the best epoch is 3"):
        _repair_best(tmp_path, {**state, "epoch": 4, "best_epoch": 3}, "dice_global")


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_names_what_changed(store, split):
    from msd_colon_lib.fingerprint import differences

    base = RunConfig(loss="iou", epochs=2, extra={"test_fraction": 0.2, "hu_window": [-160, 240]})
    fp = run_fingerprint(base, store, split)
    assert differences(fp, run_fingerprint(base, store, split)) == []
    # the device and the evaluation batch do not change a result
    same = RunConfig(loss="iou", epochs=2, device="cpu", eval_batch_size=7,
                     extra=dict(base.extra))
    assert differences(fp, run_fingerprint(same, store, split)) == []
    # --workers does: a review trained other numbers with 0 and 2 workers on the same
    # options, and a run with 2 then reused the results of one with 0 in silence
    workers = RunConfig(loss="iou", epochs=2, workers=2, extra=dict(base.extra))
    assert differences(fp, run_fingerprint(workers, store, split)) == ["workers: 0 -> 2"]
    changed = RunConfig(loss="iou", epochs=2, lr=2e-4,
                        extra={"test_fraction": 0.3, "hu_window": [-100, 240]})
    assert differences(fp, run_fingerprint(changed, store, split)) == [
        "hu_window: [-160, 240] -> [-100, 240]", "lr: 0.0001 -> 0.0002",
        "test_fraction: 0.2 -> 0.3"]
    other_split = {**split, "train": split["train"][:-1]}
    assert differences(fp, run_fingerprint(base, store, other_split))[0] == (
        f"split: train.n: {len(split['train'])} -> {len(split['train']) - 1}")
    assert differences(None, fp) == [
        "no fingerprint (written by an older version of this example)"]


def test_the_code_fingerprint_covers_every_module_that_computes_a_result(tmp_path):
    """A cached result is reused only while the code that computed it is unchanged: every
    example module that trains or scores (evaluation.py could be left out unnoticed), and
    dynloss's source, its C++ kernels included (a ``.cpp`` edit would not count)."""
    from msd_colon_lib import fingerprint

    assert set(fingerprint.code_version()["example"]) == {
        "training.py", "model.py", "evaluation.py", "splits.py", "distributed.py"}
    package = tmp_path / "pkg"
    (package / "kernels").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "kernels" / "k.cpp").write_text("int f() { return 1; }\n")
    digest = fingerprint._package_digest.__wrapped__
    before = digest(str(package))
    (package / "kernels" / "k.cpp").write_text("int f() { return 2; }\n")
    assert digest(str(package)) != before


def test_the_code_fingerprint_is_the_code_this_process_imported(tmp_path):
    """A module edited while a long grid runs: the runs after the edit still ran the code
    imported at the start, but were fingerprinted with the edited file's hash (read anew for
    every run), so the next invocation reused them as results of the new code."""
    import shutil

    from msd_colon_lib import fingerprint

    shutil.copytree(fingerprint.HERE, tmp_path / "msd_colon_lib",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from pathlib import Path\n"
        "from msd_colon_lib import fingerprint, evaluation\n"
        "before = fingerprint.code_version()['example']['evaluation.py']\n"
        "edited = Path(sys.argv[1]) / 'msd_colon_lib' / 'evaluation.py'\n"
        "edited.write_text(edited.read_text() + '\\n# edited while running\\n')\n"
        "after = fingerprint.code_version()['example']['evaluation.py']\n"
        "new = fingerprint.sha256_file(edited)[:16]\n"
        "print(before == after, after != new)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a checkpoint"])
def test_resume_of_a_damaged_checkpoint_names_it(store, split, tmp_path, damage):
    """A damaged last.pt under --resume ended in torch.load's "PytorchStreamReader failed
    reading zip archive" traceback; it is one error naming the file and the way out. Found
    by a review."""
    cfg = RunConfig(loss="iou", epochs=2, batch_size=8, lr=1e-3, device="cpu")
    assert train_run(cfg, store, split, tmp_path, progress=False, stop_after=1) == {
        "interrupted_at_epoch": 1}
    last = tmp_path / LAST
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        torch.save({"epoch": 1}, last)  # a checkpoint of something else
    with pytest.raises(MismatchError) as caught:
        train_run(cfg, store, split, tmp_path, resume=True, progress=False)
    message = str(caught.value)
    assert message.startswith(f"{last}: not a checkpoint of this example's runs (")
    assert message.endswith(f"); run without --resume to start {tmp_path} over")
    assert "\n" not in message


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_resume_without_the_runs_config_says_so(tmp_path, damage):
    """An unfinished run whose config.json was gone was refused as "started with other
    inputs (no fingerprint (written by an older version of this example))". Found by a
    review."""
    from msd_colon_lib import training

    (tmp_path / LAST).write_bytes(b"")
    if damage == "unreadable":
        (tmp_path / training.CONFIG).write_text("{half")
    action, message = training.decide(tmp_path, {"config": {}}, resume=True)
    assert (action, message) == ("refuse", (
        f"cannot --resume {tmp_path}: its {training.CONFIG} is missing or unreadable, so the "
        "inputs it was started with are unknown; run without --resume to start it over"))
    assert training.decide(tmp_path, {"config": {}}, resume=False)[0] == "fresh"


def test_resume_with_a_damaged_best_checkpoint_names_it(tmp_path):
    from msd_colon_lib.training import _repair_best

    (tmp_path / BEST).write_bytes(b"PK\x03\x04 half a zip")
    state = {"epoch": 3, "best_epoch": 2, "best": 0.5, "model": {}}
    with pytest.raises(MismatchError, match=r"best\.pt: not a checkpoint of this example's "
                                            r"runs \(.*\); run without --resume to start .* over$"):
        _repair_best(tmp_path, state, "dice_global")


def test_resume_refuses_a_run_started_with_other_options(store, split, tmp_path):
    cfg = RunConfig(loss="iou->bce@1", epochs=2, batch_size=8, lr=1e-3, device="cpu")
    assert train_run(cfg, store, split, tmp_path, progress=False, stop_after=1) == {
        "interrupted_at_epoch": 1}
    changed = RunConfig(loss="iou->bce@1", epochs=2, batch_size=8, lr=2e-3, device="cpu")
    with pytest.raises(MismatchError, match=r"cannot --resume .*: it was started with other "
                                            r"inputs \(lr: 0.001 -> 0.002\)"):
        train_run(changed, store, split, tmp_path, resume=True, progress=False)
    # without --resume it starts over, saying so
    lines = []
    res = train_run(changed, store, split, tmp_path, progress=False, log=lines.append)
    assert lines == [f"{tmp_path}: starting over an unfinished run (--resume would continue it)"]
    assert res["config"]["lr"] == 2e-3 and len(res["history"]) == 2


def test_resume_refuses_a_run_started_on_another_number_of_ranks(tmp_path):
    """The number of ranks changes the effective batch and the data each rank sees: a run
    started on 2 ranks is not resumed on 1 (mutation review: the fingerprint's world size was
    untested)."""
    import types

    from msd_colon_lib import training

    cfg = training.RunConfig(loss="dice", epochs=1, seed=0, device="cpu")
    store = types.SimpleNamespace(fingerprint={"files": {}})
    parts = {"train": np.arange(4), "val": np.arange(2), "test": np.arange(2)}
    on_two = training.run_fingerprint(cfg, store, parts, world=2, device=torch.device("cpu"))
    on_one = training.run_fingerprint(cfg, store, parts, world=1, device=torch.device("cpu"))
    (tmp_path / training.LAST).write_bytes(b"x")
    (tmp_path / training.CONFIG).write_text(json.dumps({"fingerprint": on_two}))
    action, message = training.decide(tmp_path, on_one, resume=True)
    assert action == "refuse" and "(world_size: 2 -> 1)" in message
    assert training.decide(tmp_path, on_two, resume=True) == ("resume", None)


def test_cli_reruns_finished_runs_whose_inputs_changed(tmp_path, capsys):
    """--max-cases 3, then all cases into the same --out: the second run must retrain and the
    report, runs.csv and result agree on the new data; --resume names what changed instead."""
    out = tmp_path / "out"
    args = ["--out", str(out), "--loss", "iou", "--epochs", "1", *TINY]
    first = msd_colon.main([*args, "--max-cases", "3"])
    (_, res3), = first["results"]
    assert len(first["store"]) == res3["n_train"] + res3["n_val"] + res3["n_test"]
    capsys.readouterr()
    second = msd_colon.main(args)
    (spec, res4), = second["results"]
    printed = capsys.readouterr().out
    assert f"{out / spec.name}: recomputing, its inputs changed (max_cases: 3 -> null;" in printed
    assert ("rebuilding (data file imagesTr/colon_004.nii.gz added; data file "
            "labelsTr/colon_004.nii.gz added; data: cases: [") in printed
    n = len(second["store"])
    assert n > len(first["store"]) and res4["n_train"] + res4["n_val"] + res4["n_test"] == n
    csv_row = (out / "runs.csv").read_text().splitlines()[1].split(",")
    assert csv_row[7:10] == [str(res4["n_train"]), str(res4["n_val"]), str(res4["n_test"])]
    assert f"{n} (" in (out / "report.md").read_text()
    # a finished run with other options is refused under --resume, one line, exit status 2
    report = {name: (out / name).read_bytes() for name in ("report.md", "runs.csv")}
    code = msd_colon.cli([*args, "--resume", "--hu-window", "-100", "200"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("msd_colon.py: error: ")
    assert "it finished with other inputs (hu_window: [-160.0, 240.0] -> [-100.0, 200.0];" in err
    # ... and, as nothing trained, the report stays (it was removed before the refusal; found
    # by a review of the example)
    assert {name: (out / name).read_bytes() for name in report} == report


def test_an_automatic_thread_count_stays_the_one_out_was_started_with(tmp_path, capsys,
                                                                        monkeypatch):
    """Without --threads the count follows the load (1 on a busy CPU), and it is part of a
    run's inputs: a run started on a busy CPU was refused by --resume (and retrained by a
    plain rerun) once the load had dropped. The automatic choice is now kept per --out."""
    import torch

    tiny = [a for i, a in enumerate(TINY) if "--threads" not in TINY[max(i - 1, 0):i + 1]]
    assert "--threads" not in tiny and len(tiny) == len(TINY) - 2
    args = ["--out", str(tmp_path / "out"), "--loss", "iou", "--epochs", "1", *tiny]
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))  # busy: 1 thread
        (_, first), = msd_colon.main(args)["results"]
        assert first["config"]["extra"]["threads"] == 1
        assert json.loads((tmp_path / "out" / "threads.json").read_text()) == {"threads": 1}
        # a refused invocation records nothing: it wrote its count, and the plain --resume
        # after it claimed the runs were started with 2 threads and was refused in turn
        assert msd_colon.cli([*args, "--resume", "--threads", "2"]) == 2
        assert "(threads: 1 -> 2)" in capsys.readouterr().err
        assert json.loads((tmp_path / "out" / "threads.json").read_text()) == {"threads": 1}
        torch.set_num_threads(2)
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # idle now
        capsys.readouterr()
        (_, again), = msd_colon.main([*args, "--resume"])["results"]
        printed = capsys.readouterr().out
        assert ("using 1 torch thread, the count the runs in this --out were started with "
                "(--threads N overrides)") in printed
        assert "recomputing" not in printed and again["history"] == first["history"]
        torch.set_num_threads(1)
        (_, explicit), = msd_colon.main([*args, "--threads", "2"])["results"]
        assert explicit["config"]["extra"]["threads"] == 2
        # an explicit count is the one the next invocation without --threads keeps
        assert json.loads((tmp_path / "out" / "threads.json").read_text()) == {"threads": 2}
        capsys.readouterr()
        torch.set_num_threads(1)
        (_, kept), = msd_colon.main([*args, "--resume"])["results"]
        assert "using 2 torch threads, the count" in capsys.readouterr().out
        assert kept["history"] == explicit["history"]
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------- batches


def test_loader_never_forms_a_training_batch_of_one(store):
    from msd_colon_lib.distributed import Dist
    from msd_colon_lib.training import loader

    def sizes(n, no_single=True):
        batches = loader(store, np.arange(n), 8, shuffle=True, seed=0, epoch=0, workers=0,
                         d=Dist(), pin=False, no_single=no_single)
        return [len(images) for images, _, _ in batches]

    assert sizes(17) == [8, 8]  # the single last slice sits this epoch out
    assert sizes(18) == [8, 8, 2]
    assert sizes(17, no_single=False) == [8, 8, 1]


def test_training_with_a_last_batch_of_one(store, split, tmp_path):
    """The BatchNorm of the 1x1 bottleneck cannot train on one sample ("Expected more than 1
    value per channel"); a training set of k * batch + 1 slices must still train."""
    batch = len(split["train"]) - 1
    cfg = RunConfig(loss="bce", epochs=1, batch_size=batch, lr=1e-3, device="cpu", precise_bn=1)
    res = train_run(cfg, store, split, tmp_path, progress=False)
    assert len(res["history"]) == 1 and np.isfinite(res["history"][0]["train_loss"])


def test_fingerprint_holds_the_precision_the_device_resolves_to(store, split):
    """`--amp auto` is bf16 + channels_last on CUDA and float32 on the CPU: a CPU result was
    reused for a CUDA invocation (device is not in the fingerprint); `--amp bf16` and `auto`
    that mean the same precision recomputed a valid result."""
    from msd_colon_lib.fingerprint import differences

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = RunConfig(loss="iou", epochs=2, amp="auto")
    off = RunConfig(loss="iou", epochs=2, amp="off")
    bf16 = RunConfig(loss="iou", epochs=2, amp="bf16")
    on_cpu = run_fingerprint(auto, store, split, device=cpu)
    assert differences(on_cpu, run_fingerprint(off, store, split, device=cpu)) == []
    assert differences(on_cpu, run_fingerprint(bf16, store, split, device=cpu)) == []
    assert differences(on_cpu, run_fingerprint(bf16, store, split, device=cuda)) == [
        "precision: autocast: float32 -> bfloat16", "precision: channels_last: false -> true"]


def test_benchmark_under_torchrun_puts_each_rank_on_its_own_gpu(monkeypatch, tmp_path):
    """`--benchmark` resolved "auto" without the local rank: every rank on cuda:0."""
    from types import SimpleNamespace

    from msd_colon_lib import benchmark
    from msd_colon_lib.distributed import Dist

    asked = []

    def resolve_device(device, local_rank=0):
        asked.append((device, local_rank))
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(benchmark, "resolve_device", resolve_device)
    args = SimpleNamespace(loss=["iou"], batch_size=8, lr=1e-3, encoder_weights="none",
                           amp="auto", workers=0, device="auto", benchmark_steps=1)
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_benchmark(args, [0], tmp_path, Dist(rank=3, world=4, local_rank=3),
                                synthetic=True)
    assert asked == [("auto", 3)]
