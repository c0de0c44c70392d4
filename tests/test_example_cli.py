"""examples/msd_colon.py on the command line: bad input is one line on stderr and exit status 2;
presets; training on every training slice (--val-fraction 0)."""

from __future__ import annotations

import csv
import math
import shutil
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest

import dynloss
import msd_colon
from msd_colon_lib.phantom import make_phantom
from msd_colon_lib.runner import run_splits

from ._example_helpers import TINY, TINY_DATA

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task10(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("cli") / "Task10_Colon", n_patients=4,
                        shape=(48, 48), slices=(10, 12))


def _one_line_error(capsys, argv):
    code = msd_colon.cli(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    assert captured.err.startswith("msd_colon.py: error: ") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err + captured.out
    return captured.err[len("msd_colon.py: error: "):].strip()


@pytest.mark.parametrize("extra, message", [
    (["--image-size", "48"], "--image-size must be a positive multiple of 32 (the U-Net halves "
                             "it five times); got 48"),
    (["--batch-size", "1"], "--batch-size must be at least 2 (BatchNorm cannot train on one "
                            "sample); got 1"),
    (["--loss", "iou->bcx@1"], "--loss 'iou->bcx@1': unknown name 'bcx'; did you mean 'bce'? "
                               "(known losses: bce, dice, focal, iou, jaccard, topk, tversky)"),
    (["--long-epochs", "3", "--switch-epoch", "3"],
     "--switch-epoch must lie in 1 .. --long-epochs - 1 = 2 (a switch at 3 of 3 epochs never "
     "happens)"),
    (["--val-fraction", "0", "--monitor", "dice_global"],
     "--monitor dice_global needs a validation set, but --val-fraction is 0: use --monitor "
     "train_loss (or auto), or a --val-fraction above 0"),
    (["--encoder-weights", "/nonexistent/encoder.pt"],
     "--encoder-weights must be none, imagenet or the path of an encoder state_dict; "
     "'/nonexistent/encoder.pt' is none of these"),
    (["--adaptive-trigger", "5"], "--adaptive-trigger '5' is a fixed epoch: use --switch-epoch "
                                  "for that, and a trigger such as plateau(patience=5) here"),
    (["--pair", "bce", "iou"], "--pair: the first loss must be one of dice, iou, tversky; got "
                               "'bce'"),
    # a --loss switch that its run never reaches (it trained one loss, reported as a switch)
    (["--loss", "iou->bce@6"], "--loss 'iou->bce@6': a switch at 6 of 6 epochs never happens "
                               "(a switching run trains for --long-epochs = 6)"),
    (["--loss", "dice->bce@2->focal@9", "--long-epochs", "8"],
     "--loss 'dice->bce@2->focal@9': a switch at 9 of 8 epochs never happens (a switching "
     "run trains for --long-epochs = 8)"),
    (["--download", "--data-dir", "/data/Task10_Colon"],
     "--download and --data-dir exclude each other: --data-dir reads an extracted "
     "Task10_Colon, --download fetches one (into --download-root)"),
    (["--phantom-slices", "8", "6"], "--phantom-slices needs LOW <= HIGH, both at least 1; "
                                     "got 8 6"),
    (["--workers", "-1"], "--workers must be >= 0; got -1"),
    # an infinite learning rate was accepted (and trained on NaN from the first step)
    (["--lr", "inf"], "--lr must be positive and finite; got inf"),
    (["--lr", "nan"], "--lr must be positive and finite; got nan"),
    (["--lr", "0"], "--lr must be positive and finite; got 0.0"),
    # an infinite HU window turned every voxel into NaN (inf / inf)
    (["--hu-window", "-160", "inf"], "--hu-window needs finite LO < HI; got -160.0 inf"),
    (["--hu-window", "100", "-100"], "--hu-window needs finite LO < HI; got 100.0 -100.0"),
    # accepted and ignored with --loss: the report then gave --switch-epoch as the switch
    (["--loss", "iou->bce@2", "--switch-epoch", "1"],
     "--switch-epoch does not apply with --loss: a spec's own @N is its switch (only "
     "--switch-lr restart reads it, for the runs without a switch)"),
    (["--loss", "iou", "--experiment", "table4"],
     "--experiment does not apply with --loss: --loss runs exactly the given specs"),
    (["--loss", "iou", "--pair", "dice", "focal"],
     "--pair does not apply with --loss: --loss runs exactly the given specs"),
    (["--switch-lr", "restart", "--loss", "iou", "--loss", "iou->bce@2", "--loss",
      "iou->bce@4"],
     "--switch-lr restart: the runs without a switch restart where the switching runs switch, "
     "but the --loss switches are at epochs 2 and 4: give one switch epoch per invocation"),
    # tracebacks (or silently ignored) before these were checked
    (["--device", "foo"], "--device must be auto, cpu, cuda or cuda:N; got 'foo'"),
    (["--device", "cuda:"], "--device must be auto, cpu, cuda or cuda:N; got 'cuda:'"),
    (["--threads", "-1"], "--threads must be at least 1; got -1"),
    (["--threads", "0"], "--threads must be at least 1; got 0"),
    (["--benchmark", "--benchmark-steps", "0"], "--benchmark-steps must be at least 1; got 0"),
    (["--phantom-size", "0"], "--phantom-size must be at least 1; got 0"),
    (["--phantom-patients", "0"], "--phantom-patients must be at least 1; got 0"),
    (["--phantom-seed", "-1"], "--phantom-seed must be >= 0; got -1"),
    # accepted when only table1 ran: the report's Setup then gave a restart "at epoch -5"
    (["--experiment", "table1", "--switch-epoch", "-5", "--switch-lr", "restart"],
     "--switch-epoch must lie in 1 .. --long-epochs - 1 = 5 (a switch at -5 of 6 epochs never "
     "happens)"),
    # the switch epoch defaults to --epochs: the error named an option that was not given
    (["--epochs", "3", "--long-epochs", "3"],
     "--switch-epoch (default: --epochs = 3) must lie in 1 .. --long-epochs - 1 = 2 (a switch "
     "at 3 of 3 epochs never happens)"),
    # Table 2's composites do not switch: --switch-epoch was range-checked (then accepted and
    # ignored) for them
    (["--experiment", "table2", "--switch-epoch", "1"],
     "--switch-epoch applies only to the experiments that switch, or with --switch-lr restart; "
     "the chosen experiments (table2) do not read it"),
    (["--experiment", "table1", "--switch-epoch", "2"],
     "--switch-epoch applies only to the experiments that switch, or with --switch-lr restart; "
     "the chosen experiments (table1) do not read it"),
    # specs that parse but cannot train the U-Net: a traceback at the first training step,
    # after the report was removed (found by a review of the example's options)
    (["--loss", "iou(reduction='none')"],
     "--loss \"iou(reduction='none')\": the loss must give one number per batch, and IoULoss("
     "reduction='none') gives a tensor of shape (1,) (reduction='none' is for inspection)"),
    (["--loss", "iou->bce(reduction='none')@2", "--long-epochs", "3"],
     "--loss \"iou->bce(reduction='none')@2\": the loss must give one number per batch, and "
     "BCELoss(reduction='none') gives a tensor of shape (2, 1, 32, 32) (reduction='none' is "
     "for inspection)"),
    (["--loss", "iou(mode='multiclass')"],
     "--loss \"iou(mode='multiclass')\" cannot train the U-Net (one channel of logits per "
     "pixel, a 0/1 mask): "
     "mode='multiclass' needs an input with C >= 2 channels; got C=1 in input shape (2, 1, 32, "
     "32) (use mode='binary' for one foreground channel)"),
    (["--loss", "dice+iou(from_logits=False)", "--long-epochs", "3"],
     "--loss 'dice+iou(from_logits=False)' cannot train the U-Net (one channel of logits per "
     "pixel, a 0/1 mask): "
     "input must hold probabilities in [0, 1] when from_logits=False; got values from -3.0 to "
     "3.0 (pass from_logits=True for logits)"),
    (["--seeds", "0", "-1"], "--seeds must be >= 0; got [0, -1]"),
    (["--split-seed", "-1"], "--split-seed must be >= 0; got -1"),
    # a trigger that cannot fire within the run: reported as a switch that never happened
    (["--loss", "iou->bce@plateau(patience=1, min_epochs=5)", "--long-epochs", "2"],
     "--loss 'iou->bce@plateau(patience=1, min_epochs=5)': its trigger Plateau(patience=1, "
     "min_epochs=5) cannot switch before epoch 5 (min_epochs=5) of 2 epochs, so the switch "
     "never happens (a switching run trains for --long-epochs = 2)"),
    (["--loss", "iou->bce@plateau(min_epochs=5)", "--long-epochs", "6"],  # patience 10
     "--loss 'iou->bce@plateau(min_epochs=5)': its trigger Plateau(min_epochs=5) cannot switch "
     "before epoch 10 (patience=10) of 6 epochs, so the switch never happens (a switching run "
     "trains for --long-epochs = 6)"),
    (["--loss", "iou->bce@1->focal@plateau(min_epochs=2, patience=0)", "--long-epochs", "3"],
     "--loss 'iou->bce@1->focal@plateau(min_epochs=2, patience=0)': its trigger "
     "Plateau(patience=0, min_epochs=2) cannot switch before epoch 3 (its stage begins at epoch "
     "1 at the earliest, then min_epochs=2) of 3 epochs, so the switch never happens (a "
     "switching run trains for --long-epochs = 3)"),
    (["--experiment", "adaptive", "--long-epochs", "4", "--adaptive-trigger",
      "relative_improvement(window=2, patience=2)"],
     "--adaptive-trigger 'relative_improvement(window=2, patience=2)': its trigger "
     "RelativeImprovement(window=2, patience=2) cannot switch before epoch 4 (window=2 + "
     "patience=2) of 4 epochs, so the switch never happens (the adaptive runs train for "
     "--long-epochs = 4)"),
    # accepted with --loss though no run read them, and stated in the report's Setup as if
    # they had been (found by a review)
    (["--loss", "iou->bce@1", "--epochs", "7"],
     "--epochs does not apply to the --loss specs given: a single loss trains for --epochs "
     "(a composite or switch for --long-epochs), and none of them ('iou->bce@1') is one"),
    (["--loss", "iou", "--loss", "bce", "--long-epochs", "9"],
     "--long-epochs does not apply to the --loss specs given: a composite or switch trains for "
     "--long-epochs (a single loss for --epochs), and none of them ('iou', 'bce') is one"),
    (["--loss", "iou->bce@1", "--long-epochs", "3", "--switch-lr", "restart", "--switch-epoch",
      "2"],
     "--switch-epoch does not apply to the --loss specs given: with --switch-lr restart it is "
     "the epoch where the runs without a switch restart, and every one of them switches at its "
     "own"),
    # accepted and silently ignored
    (["--loss", "iou", "--adaptive-trigger", "plateau(patience=2)"],
     "--adaptive-trigger does not apply with --loss: --loss runs exactly the given specs"),
    (["--download-root", "/nonexistent/msd"],
     "--download-root applies only with --download (it is where the tar is downloaded to)"),
    # a grid option that none of the chosen experiments reads
    (["--folds", "3"], "--folds applies only to --experiment table4; the chosen experiments "
                       "(demo) do not read it"),
    (["--experiment", "table1", "table4", "--switch-fractions", "0.5"],
     "--switch-fractions applies only to --experiment switchpoints; the chosen experiments "
     "(table1 table4) do not read it"),
    # a "trigger" that adds a stage: the adaptive run became iou->bce@plateau(...)->dice@2
    (["--experiment", "adaptive", "--adaptive-trigger", "plateau(patience=1)->dice@2"],
     "--adaptive-trigger 'plateau(patience=1)->dice@2' is not one trigger: the adaptive run "
     "would be 'iou->bce@plateau(patience=1)->dice@2', a switch of 3 stages"),
    # every swept point falls on the switch epoch: one row, an empty comparison
    (["--experiment", "switchpoints", "--long-epochs", "3", "--switch-epoch", "2",
      "--switch-fractions", "0.5", "0.9"],
     "--switch-fractions 0.5 0.9 of --long-epochs 3 all fall on the switch epoch 2 (rounded, "
     "within 1 .. 2): the switch points have nothing to compare"),
    (["--experiment", "switchpoints", "--adaptive-trigger", "plateau(patience=1)"],
     "--adaptive-trigger applies only to --experiment adaptive; the chosen experiments "
     "(switchpoints) do not read it"),
    (["--experiment", "table2", "--pair", "dice", "focal"],
     "--pair applies only to --experiment demo, controls, switchpoints or adaptive; the chosen "
     "experiments (table2) do not read it"),
    # --benchmark times training steps of each --loss: the grid's options were ignored
    (["--benchmark", "--pair", "dice", "focal"],
     "--pair does not apply with --benchmark: it times training steps of each --loss (default "
     "iou, bce and iou+bce)"),
    (["--benchmark", "--experiment", "table3"],
     "--experiment does not apply with --benchmark: it times training steps of each --loss "
     "(default iou, bce and iou+bce)"),
    (["--benchmark", "--loss", "iou->bce@2", "--switch-epoch", "2"],
     "--switch-epoch does not apply with --benchmark: it times training steps of each --loss "
     "(default iou, bce and iou+bce)"),
    (["--benchmark", "--seeds", "1", "2"],
     "--seeds does not apply with --benchmark: it times training steps of each --loss (default "
     "iou, bce and iou+bce)"),
    (["--benchmark", "--epochs", "3"],
     "--epochs does not apply with --benchmark: it times training steps of each --loss (default "
     "iou, bce and iou+bce)"),
    # options of the splits and of the LR schedule that the benchmark's steps never read
    # (accepted and ignored; found by a review of the example)
    *[(["--benchmark", *option],
       f"{option[0]} does not apply with --benchmark: it times training steps of each --loss "
       "(default iou, bce and iou+bce)")
      for option in (["--split", "slice"], ["--split-seed", "3"], ["--test-fraction", "0.5"],
                     ["--val-fraction", "0.3"], ["--plateau-patience", "7"],
                     ["--precise-bn", "3"], ["--monitor", "train_loss"])],
    # a run option that none of the chosen experiments reads (refused with --loss already)
    (["--experiment", "table1", "--long-epochs", "30"],
     "--long-epochs applies only to the experiments with composite or switching runs; the "
     "chosen experiments (table1) do not read it"),
    (["--experiment", "table2", "--epochs", "7"],
     "--epochs applies only to the experiments with single-loss runs or a switch (whose epoch "
     "it sets by default); the chosen experiments (table2) do not read it"),
    (["--benchmark", "--resume"],
     "--resume does not apply with --benchmark: it times training steps of each --loss "
     "(default iou, bce and iou+bce)"),
])
def test_bad_options_are_one_line_naming_the_option(capsys, tmp_path, extra, message):
    assert _one_line_error(capsys, ["--out", str(tmp_path), *TINY, *extra]) == message


def test_bad_data_is_one_line_naming_the_file(capsys, tmp_path, task10):
    root = shutil.copytree(task10, tmp_path / "Task10_Colon")
    base = ["--out", str(tmp_path / "out"), *TINY_DATA, "--encoder-weights", "none",
            "--data-dir", str(root), "--loss", "iou", "--epochs", "1"]
    assert _one_line_error(capsys, [*base[:-6], "--data-dir", str(tmp_path)]) == (
        f"{tmp_path / 'dataset.json'} not found: --data-dir must be the Task10_Colon folder "
        "(the one holding dataset.json, imagesTr/ and labelsTr/)")
    label = root / "labelsTr" / "colon_002.nii.gz"
    raw = label.read_bytes()
    label.write_bytes(raw[: len(raw) // 2])
    error = _one_line_error(capsys, base)
    assert error.startswith(f"{label}: cannot read the voxels of the label of colon_002 "
                            "(EOFError: ")
    label.unlink()
    assert _one_line_error(capsys, base) == (
        f"the label of colon_002 {label} is listed in dataset.json but does not exist")


def test_imagenet_weights_offline_say_what_to_do(capsys, tmp_path, monkeypatch):
    """The paper preset loads ImageNet weights (smp's default); without network the CLI says
    how to go on, before any data is prepared."""
    import segmentation_models_pytorch as smp

    def offline(*args, **kwargs):
        if kwargs.get("encoder_weights") == "imagenet":
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        return original(*args, **kwargs)

    original = smp.Unet
    monkeypatch.setattr(smp, "Unet", offline)
    error = _one_line_error(capsys, ["--out", str(tmp_path), *TINY, "--preset", "paper"])
    assert error == (
        "could not load 'imagenet' weights for efficientnet-b0 (URLError: <urlopen error [Errno "
        "-3] Temporary failure in name resolution>). Without network access, pass "
        "--encoder-weights none (train from scratch) or --encoder-weights PATH to an encoder "
        "state_dict saved where the download works.")
    assert not (tmp_path / "phantom").exists()  # failed before the data


def test_slice_split_without_validation_has_the_papers_counts():
    """13,486 slices by slice, no validation set: 10,788 train and 2,698 test, as in the paper
    (a 10 % validation set would leave 9,709)."""
    store = SimpleNamespace(patients=np.repeat(np.arange(126), 108)[:13486],
                            patient_names=[f"colon_{i:03d}" for i in range(126)])
    args = SimpleNamespace(split="slice", split_seed=0, test_fraction=0.2, val_fraction=0.0,
                           folds=5)
    spec = SimpleNamespace(fold=None, name="runs/iou/e50/seed0")
    split = run_splits(args, store, spec)
    assert [len(split[k]) for k in ("train", "val", "test")] == [10788, 0, 2698]
    args.val_fraction = 0.1
    assert len(run_splits(args, store, spec)["train"]) == 9709


def test_training_on_every_training_slice(tmp_path):
    """--val-fraction 0: no validation set, ReduceLROnPlateau and best.pt watch the training
    loss, and every training slice is trained on."""
    out = tmp_path / "out"
    result = msd_colon.main(["--out", str(out), *TINY, "--loss", "bce", "--epochs", "2",
                             "--val-fraction", "0", "--split", "slice"])
    (_, res), = result["results"]
    n = len(result["store"])
    assert (res["n_train"], res["n_val"], res["n_test"]) == (math.floor(0.8 * n), 0,
                                                             n - math.floor(0.8 * n))
    assert res["monitor"] == "train_loss" and res["config"]["monitor"] == "train_loss"
    losses = [h["train_loss"] for h in res["history"]]
    assert res["best_val"] == min(losses) and res["best_epoch"] == 1 + losses.index(min(losses))
    assert not any(k.startswith("val_") for h in res["history"] for k in h)
    report = (out / "report.md").read_text()
    assert "- validation set: none (all training slices are trained on)" in report
    assert "ReduceLROnPlateau(min train_loss, patience 2, factor 0.1)" in report


def test_table2_alone_needs_no_switch_epoch(capsys, tmp_path):
    """`--experiment table2 --long-epochs 3` (composites, no switch) was refused: "--switch-epoch
    must lie in 1 .. 2 (a switch at 3 of 3 epochs never happens)", an option not given."""
    result = msd_colon.main(["--dry-run", "--out", str(tmp_path), "--experiment", "table2",
                             "--long-epochs", "3"])  # (the switch epoch would be --epochs = 3)
    assert [spec.loss for spec in result["plan"]] == ["tversky+bce", "iou+bce", "iou+topk",
                                                      "dice+focal"]


def test_switch_lr_restart_epoch_of_each_arm():
    """restart: the runs without a switch restart at --switch-epoch when they are still
    training then; a run that ends first (Table 1's single losses) is a plain keep run."""
    from msd_colon_lib.experiments import RunSpec
    from msd_colon_lib.runner import run_config

    args = msd_colon.main(["--dry-run", "--switch-lr", "restart"])["args"]
    assert args.switch_epoch == 3 and (args.epochs, args.long_epochs) == (3, 6)
    cases = {
        RunSpec("table1", "iou", 3, 0): ("keep", None),
        RunSpec("controls", "iou", 6, 0): ("restart", 3),
        RunSpec("table2", "iou+bce", 6, 0): ("restart", 3),
        RunSpec("table3", "iou->bce@3", 6, 0): ("restart", None),  # at its own switch
    }
    for spec, expected in cases.items():
        cfg = run_config(args, spec, synthetic=True)
        assert (cfg.switch_lr, cfg.restart_at) == expected, spec
    keep = msd_colon.main(["--dry-run"])["args"]
    cfg = run_config(keep, RunSpec("table2", "iou+bce", 6, 0), synthetic=True)
    assert (cfg.switch_lr, cfg.restart_at) == ("keep", None)


def test_the_switch_epoch_follows_the_single_loss_budget_unless_given():
    """--switch-epoch defaults to --epochs (the paper: Table 1's 50 of 100); the presets' fixed
    3 and 50 overrode that, so `--epochs 4 --long-epochs 8` still switched at 3."""
    args = msd_colon.main(["--dry-run", "--epochs", "4", "--long-epochs", "8"])["args"]
    assert args.switch_epoch == 4
    assert msd_colon.main(["--dry-run"])["args"].switch_epoch == 3
    given = msd_colon.main(["--dry-run", "--epochs", "4", "--long-epochs", "8",
                            "--switch-epoch", "2"])["args"]
    assert given.switch_epoch == 2


def test_switch_lr_restart_with_loss_specs_restarts_where_they_switch():
    """With --loss, the arms without a switch restart at the specs' own switch epoch (they
    restarted at --switch-epoch, 3 here, while the switching arm restarted at 2)."""
    from msd_colon_lib.experiments import RunSpec
    from msd_colon_lib.runner import run_config

    args = msd_colon.main(["--dry-run", "--switch-lr", "restart", "--loss", "iou+bce",
                           "--loss", "iou->bce@2"])["args"]
    cfg = run_config(args, RunSpec("table2", "iou+bce", 6, 0), synthetic=True)
    assert (cfg.switch_lr, cfg.restart_at) == ("restart", 2)


@pytest.mark.parametrize("missing", ["tqdm", "numpy"])
def test_a_missing_extra_is_one_line_naming_the_extra(missing):
    """Without the ``[examples]`` extra the script ended in a traceback."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(msd_colon.__file__)
    code = (f"import runpy, sys; sys.modules[{missing!r}] = None; sys.argv = ['msd_colon.py', "
            f"'--help']; runpy.run_path({str(script)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"msd_colon.py: error: it needs {missing!r}, which is not installed: "
        'pip install -e ".[examples]" in the repository']


def test_the_demo_trains_every_loss_and_reads_its_options(capsys):
    """``examples/demo.py`` ran its whole minute whatever the arguments (``--help`` included)
    and no test ran it."""
    import demo

    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0 and "usage: demo.py" in capsys.readouterr().out
    demo.main(["--epochs", "2", "--steps", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("synthetic blobs, tiny CNN, 2 epochs x 1 steps")
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["bce", "focal", "topk", "dice", "iou", "tversky",
                                        "dice+focal", "iou->bce@1"]
    first_bce = demo.train(dynloss.BCELoss(), 2, 1)[0]
    assert float(rows[0][1]) == pytest.approx(first_bce, abs=5e-5)  # the printed first loss
    for row in rows:
        assert 0.0 <= float(row[3]) <= 1.0


def test_a_missing_metric_is_printed_as_na():
    """A test set without tumour and a run that predicts none: the per-patient Dice is NaN,
    saved as None, and the summary line crashed formatting it."""
    from msd_colon_lib.runner import summary_line

    line = summary_line("runs/bce/e3/seed0", "bce",
                        {"dice_global": 0.5, "dice_patient": None, "dice_slice": float("nan")})
    assert line == ("  runs/bce/e3/seed0 (bce): test Dice global 0.5000, per patient n/a, per "
                    "slice n/a")


def test_a_rerun_that_fails_leaves_no_report_of_the_previous_run(tmp_path, monkeypatch):
    """report.md, runs.csv and the figures were rewritten only at the end: a rerun killed
    midway left the previous run's complete-looking report beside its new results."""
    from msd_colon_lib import runner

    out = tmp_path / "out"
    out.mkdir()
    for name in ("report.md", "runs.csv", "loss_curves.png", "qualitative.png"):
        (out / name).write_text("previous run")

    def killed(*args, before_change, **kwargs):  # killed once the run has started training
        before_change()
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_run", killed)
    with pytest.raises(KeyboardInterrupt):
        msd_colon.main(["--out", str(out), *TINY, "--loss", "bce", "--epochs", "1"])
    assert not [p.name for p in out.iterdir() if p.is_file() and p.suffix in (".md", ".csv",
                                                                               ".png")]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_asked_for_on_the_cpu_is_said_to_do_nothing(tmp_path, monkeypatch, capsys, amp):
    """`--amp bf16 --device cpu` trained in float32 without a word (found by a review of the
    example): mixed precision is used on CUDA only."""
    from msd_colon_lib import runner

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_run", killed)
    with pytest.raises(KeyboardInterrupt):
        msd_colon.main(["--out", str(tmp_path), *TINY, "--loss", "bce", "--epochs", "1",
                        "--device", "cpu", "--amp", amp])
    note = (f"--amp {amp}: mixed precision is used on CUDA only; the runs on the CPU train in "
            "float32")
    assert capsys.readouterr().out.splitlines().count(note) == 1


def test_a_phantom_given_as_data_dir_is_reported_as_synthetic(tmp_path, task10, capsys,
                                                              monkeypatch):
    """The banner and the preset followed the flags, not the data: a phantom passed with
    --data-dir was reported as real data, with the paper preset."""
    from msd_colon_lib import runner

    args = msd_colon.main(["--dry-run", "--data-dir", str(task10)])["args"]
    assert args.preset == "demo" and "synthetic" in args.preset_reason
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        msd_colon.main(["--out", str(tmp_path), *TINY_DATA, "--data-dir", str(task10), "--loss",
                        "bce", "--epochs", "1"])
    assert (f"NOTE: --data-dir {task10} holds a SYNTHETIC phantom"
            in capsys.readouterr().out)


def test_the_thread_count_is_part_of_a_runs_configuration():
    """Results depend on torch's thread count (chosen by the machine's load when --threads is
    not given), and a rerun with another count reused them."""
    import torch

    from msd_colon_lib.experiments import RunSpec
    from msd_colon_lib.runner import run_config

    args = msd_colon.main(["--dry-run"])["args"]
    spec = RunSpec("table1", "iou", 3, 0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_config(args, spec, synthetic=True)
        torch.set_num_threads(2)
        two = run_config(args, spec, synthetic=True)
    finally:
        torch.set_num_threads(before)
    assert (one.extra["threads"], two.extra["threads"]) == (1, 2)


def test_the_report_lists_the_seeds_that_ran():
    """Table 4 (5-fold cross-validation) trains seed 0 only; the report listed every --seeds."""
    from msd_colon_lib.runner import trained_seeds

    args = msd_colon.main(["--dry-run", "--experiment", "table4", "--seeds", "0", "1", "2"])
    assert trained_seeds(args["plan"]) == [0]


def test_the_demo_refuses_a_run_too_short_to_switch(capsys):
    """With --epochs 1 the iou->bce@1 row never switched: it was IoU, labelled a switch."""
    import demo

    with pytest.raises(SystemExit) as info:
        demo.main(["--epochs", "1"])
    assert info.value.code == 2
    assert "--epochs must be >= 2 (the switching run switches at epochs // 2); got 1" in (
        capsys.readouterr().err)


def test_a_benchmark_keeps_the_report_of_the_grid(tmp_path, monkeypatch):
    """--benchmark writes benchmark.md only: it must not remove the grid's report."""
    from msd_colon_lib import benchmark

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("the grid's report")
    monkeypatch.setattr(benchmark, "run_benchmark", lambda *args, **kwargs: {})
    msd_colon.main(["--out", str(out), *TINY, "--benchmark"])
    assert (out / "report.md").read_text() == "the grid's report"


@pytest.mark.parametrize("source", ["--data-dir", "--download"])
@pytest.mark.parametrize("option, value", [
    ("--phantom-patients", ["50"]), ("--phantom-size", ["64"]), ("--phantom-seed", ["3"]),
    ("--phantom-slices", ["4", "6"]),
])
def test_phantom_options_with_given_data_are_refused(capsys, tmp_path, task10, monkeypatch,
                                                     source, option, value):
    """The phantom's options were accepted and ignored with --data-dir (or --download)."""
    from msd_colon_lib import download

    monkeypatch.setattr(download, "fetch_task10", lambda *a, **k: pytest.fail("downloads"))
    data = ["--data-dir", str(task10)] if source == "--data-dir" else ["--download"]
    error = _one_line_error(capsys, ["--out", str(tmp_path), *TINY_DATA, *data, option, *value,
                                     "--loss", "iou", "--epochs", "1"])
    assert error == (f"{option} applies only to the generated phantom; with {source} the data "
                     "are given")
    assert not any(tmp_path.iterdir())


def test_too_many_folds_for_the_patients_are_refused_before_any_run(capsys, tmp_path,
                                                                    monkeypatch):
    """5-fold by patient on 4 patients was refused only when Table 4 came to train, after
    every run of Table 1 had trained."""
    from msd_colon_lib import runner

    trained = []

    def train_run(*args, **kwargs):
        trained.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_run", train_run)
    error = _one_line_error(capsys, ["--out", str(tmp_path), *TINY, "--epochs", "1",
                                     "--long-epochs", "2", "--experiment", "table1", "table4"])
    assert error.startswith("cannot split 4 patients (") and error.endswith(
        " slices) into --folds 5 with --split patient: 5-fold by patient needs at least 5 "
        "patients, got 4")
    assert trained == [] and not (tmp_path / "runs").exists()
    # --folds 4 fits the 4 patients: it gets to the runs
    with pytest.raises(KeyboardInterrupt):
        msd_colon.main(["--out", str(tmp_path), *TINY, "--epochs", "1", "--long-epochs", "2",
                        "--experiment", "table4", "--folds", "4"])
    assert len(trained) == 1


@pytest.mark.parametrize("device, count, message", [
    ("cuda", 0, "--device cuda: CUDA is not available on this machine; use --device cpu (or "
                "auto)"),
    ("cuda:1", 0, "--device cuda:1: CUDA is not available on this machine; use --device cpu "
                  "(or auto)"),
    ("cuda:1", 1, "--device cuda:1: this machine has 1 CUDA device(s), cuda:0 .. cuda:0"),
])
def test_an_unavailable_cuda_device_is_one_line_before_any_work(capsys, tmp_path, monkeypatch,
                                                                device, count, message):
    """--device cuda on a CPU-only machine ended in torch's "Found no NVIDIA driver" traceback
    (after the phantom was written)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    argv = ["--out", str(tmp_path), *TINY, "--loss", "iou", "--epochs", "1"]
    assert _one_line_error(capsys, [*argv, "--device", device]) == message
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("device, local_rank, count, message", [
    ("cuda:1", 0, 2, "--device cuda:1 under torchrun (WORLD_SIZE=2) would put every rank on "
                     "cuda:1; use --device cuda (rank LOCAL_RANK takes cuda:LOCAL_RANK) and "
                     "choose the GPUs with CUDA_VISIBLE_DEVICES"),
    ("cuda", 1, 1, "--device cuda under torchrun: LOCAL_RANK=1 but this machine has 1 CUDA "
                   "device(s); start at most 1 process(es) per node (torchrun "
                   "--nproc-per-node)"),
    ("auto", 1, 1, "--device auto under torchrun: LOCAL_RANK=1 but this machine has 1 CUDA "
                   "device(s); start at most 1 process(es) per node (torchrun "
                   "--nproc-per-node)"),
])
def test_a_torchrun_launch_refuses_a_device_every_rank_would_share(
        capsys, tmp_path, monkeypatch, device, local_rank, count, message):
    """Under torchrun, --device cuda:1 put every rank on cuda:1 (the index won over
    LOCAL_RANK), and a LOCAL_RANK past the last GPU failed deep in NCCL's set-up."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    argv = ["--out", str(tmp_path), *TINY, "--loss", "iou", "--epochs", "1"]
    assert _one_line_error(capsys, [*argv, "--device", device]) == message
    assert not any(tmp_path.iterdir())


def test_the_closing_note_of_a_phantom_data_dir_names_the_data_dir(capsys, tmp_path, task10):
    """With --data-dir <a phantom> the last line said "no --data-dir/--download given"."""
    msd_colon.main(["--out", str(tmp_path), *TINY_DATA, "--data-dir", str(task10), "--loss",
                    "iou", "--epochs", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    note = (f"NOTE: --data-dir {task10} holds a SYNTHETIC phantom (its dataset.json says so), "
            "not patient data: the numbers show that the pipeline works, not what the paper "
            "claims.")
    assert lines[0] == lines[-1] == note
    assert not any("no --data-dir/--download given" in line for line in lines)


def test_the_help_gives_each_default_once_and_never_none():
    """``--help`` added "(default: None)" after every option whose default comes from the
    preset, also after help that states the real one ("(default 10) (default: None)")."""
    text = msd_colon.parser().format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    flat = " ".join(text.split())
    assert "number of volumes (default 10)" in flat
    assert "DataLoader worker processes (default: 0)" in flat  # a default of 0 is one
    for line in flat.split(" --")[1:]:
        assert line.count("(default") <= 1, line


def test_the_report_says_which_runs_restarted_and_what_best_val_monitors(tmp_path):
    """--switch-lr restart with runs that end before the restart epoch: the report claimed "at
    epoch 1 of every other run, the LR returns to ..." though no run restarted; runs.csv's
    best_val held the lowest training loss without saying that it monitors train_loss."""
    out = tmp_path / "out"
    msd_colon.main(["--out", str(out), *TINY, "--loss", "iou", "--loss", "bce", "--epochs",
                    "1", "--switch-lr", "restart", "--val-fraction", "0"])
    report = (out / "report.md").read_text()
    assert "; 0 of 2 runs restarted here)" in report
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [row["monitor"] for row in rows] == ["train_loss", "train_loss"]
    assert all(row["lr_restarts"] == "" for row in rows)


def test_the_restarts_are_counted_over_runs_not_report_rows():
    """A run that serves two sections (the fixed switch of the demo's Table 3 and of the
    controls) was counted once per section: "18 of 22 runs restarted" where the command had
    trained 16 runs (found by a review of the example)."""
    from msd_colon_lib.experiments import RunSpec
    from msd_colon_lib.runner import restart_count

    fixed = {"lr_restarts": [[3, 1e-3]]}
    results = [(RunSpec("table1", "iou", 3, 0), {}),
               (RunSpec("table3", "iou->bce@3", 6, 0), fixed),
               (RunSpec("controls", "iou->bce@3", 6, 0, pair="iou&bce"), fixed),
               (RunSpec("controls", "iou", 6, 0, pair="iou&bce"), {"lr_restarts": [[3, 1e-3]]}),
               (RunSpec("controls", "bce", 6, 0, pair="iou&bce"), {})]
    assert restart_count(results) == (2, 4)


def test_a_missing_data_dir_is_named_before_the_encoder_weights_load(capsys, tmp_path,
                                                                     monkeypatch):
    """With real data the preset loads ImageNet weights; offline, a mistyped --data-dir was
    reported as the weights' network error (they loaded before the folder was read)."""
    from msd_colon_lib import model

    def offline(*args, **kwargs):
        raise AssertionError("the weights were loaded before --data-dir was checked")

    monkeypatch.setattr(model, "build_model", offline)
    missing = tmp_path / "Task10_Colon"
    error = _one_line_error(capsys, ["--out", str(tmp_path / "out"), *TINY_DATA,
                                     "--data-dir", str(missing)])
    assert error == (f"{missing / 'dataset.json'} not found: --data-dir must be the "
                     "Task10_Colon folder (the one holding dataset.json, imagesTr/ and "
                     "labelsTr/)")


def test_different_losses_never_share_a_run_folder():
    """`(iou+bce)*2` and `(iou+bce*2)` were both named `_iou_plus_bcex2`: only the first was
    trained, and the report gave its numbers to both."""
    from msd_colon_lib import experiments

    a, b = "(iou+bce)*2", "(iou+bce*2)"
    assert experiments.slug(a) != experiments.slug(b)
    grid = experiments.plan("table1", losses=[a, b], epochs=2, long_epochs=4, switch_epoch=2)
    assert sorted(s.loss for s in experiments.unique_runs(grid)) == sorted([a, b])
    # the same spec spelled with other spaces is the same run; plain specs keep their names
    assert experiments.slug("iou + bce") == experiments.slug("iou+bce") == "iou_plus_bce"
    assert experiments.slug("iou->bce@50") == "iou_to_bce_at_50"
    assert experiments.slug("iou->bce@plateau(patience=5, max_epochs=75)") == experiments.slug(
        "iou->bce@plateau(patience=5,max_epochs=75)")


def test_two_losses_on_one_run_folder_are_refused(monkeypatch):
    """The safety net under the names: whatever maps two losses to one folder is an error, never
    one run reported twice."""
    from msd_colon_lib import experiments

    monkeypatch.setattr(experiments, "slug", lambda spec: "same")
    specs = [experiments.RunSpec("table1", "iou", 2, 0), experiments.RunSpec("table1", "bce", 2, 0)]
    with pytest.raises(ValueError, match="'iou' and 'bce' would share the run folder "
                                         "runs/same/e2/seed0"):
        experiments.unique_runs(specs)
    same = [experiments.RunSpec("table1", "iou+bce", 2, 0),
            experiments.RunSpec("table2", "iou + bce", 2, 0)]
    assert experiments.unique_runs(same) == same[:1]


def test_a_dry_run_benchmark_lists_the_losses_it_times(capsys):
    """`--dry-run --benchmark` printed the training grid (4 runs, table3's among them), which a
    benchmark never trains."""
    msd_colon.main(["--dry-run", "--benchmark"])
    assert capsys.readouterr().out.splitlines() == [
        "benchmark: 30 timed training steps of each loss: 'iou', 'bce', 'iou+bce'"]
    msd_colon.main(["--dry-run", "--benchmark", "--loss", "dice", "--benchmark-steps", "5"])
    assert capsys.readouterr().out.splitlines() == [
        "benchmark: 5 timed training steps of each loss: 'dice'"]
