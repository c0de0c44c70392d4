"""The one-call GPU script and the CUDA benchmark, checked without a GPU.

* ``benchmarks/run_all_gpu.sh`` and ``benchmarks/run_gpu.sh`` parse, and the preflight fails
  loudly (exit 2, saying how to fetch them) when the carried wheels are missing.
* ``benchmarks/bench_cuda.py --cpu-smoke`` runs every code path of the benchmark (eager and
  compiled timing, launch counting, peak memory, host time, the report, the goals, the plots)
  on tiny shapes under Triton's interpreter, and reports the kernels' launch counts.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "benchmarks" / "run_all_gpu.sh", ROOT / "benchmarks" / "run_gpu.sh"]
WHEELS = ["segmentation_models_pytorch-0.6.0-py3-none-any.whl", "monai-1.6.1-py3-none-any.whl"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_gpu_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_preflight_fails_loudly_without_the_wheels():
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPTS[0]), "--check"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    if all((ROOT / ".whl" / wheel).is_file() for wheel in WHEELS):
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "preflight ok" in proc.stdout
    else:
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "PREFLIGHT FAILED" in proc.stderr and "--fetch-wheels" in proc.stderr


def test_benchmark_cpu_smoke(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_cuda.py"), "--cpu-smoke",
         "--losses", "dice,topk,dice+focal", "--impls", "dynloss,torch,nnunet",
         "--compile-budget", "20", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    reports = list(tmp_path.glob("bench_*.json"))
    assert len(reports) == 1, list(tmp_path.iterdir())
    data = json.loads(reports[0].read_text())
    rows = [r for r in data["rows"] if r["impl"] == "dynloss"]
    assert rows and not [r for r in rows if r["error"]], [r["error"] for r in rows]
    for row in rows:
        assert row["ms"] > 0 and row["max_abs_diff_vs_reference"] < 1e-5, row
        # the CPU smoke counts the multiclass host-side index check as well
        expected = 6 if row["loss"] == "topk" else 3
        extra = 3 if row["mode"] == "multiclass" else 0
        assert row["launches"] == expected + extra, row
    assert any(r["compiled_ms"] for r in rows), "no compiled measurement"
    assert {r["impl"] for r in data["rows"]} >= {"dynloss", "torch", "nnunet"}
    report = reports[0].with_suffix(".md").read_text()
    assert "## Goals (issue #12)" in report and "Host time" in report
    assert list(tmp_path.glob("bench_*.png")), "no plot"


def test_benchmark_refuses_a_dynloss_row_whose_value_is_wrong(tmp_path):
    """bench_cuda.py printed the dynloss row's difference from the reference but timed and
    published the row whatever it was (a loss twice the right one exited 0); every row's value
    is now compared, and a dynloss row that differs is an error (exit status 1)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""
    script = ROOT / "benchmarks" / "bench_cuda.py"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['bench_cuda.py', '--cpu-smoke', '--losses', 'dice', '--impls', "
        f"'dynloss,torch', '--host-losses', '', '--compile-budget', '0', '--out', "
        f"{str(tmp_path)!r}]\n"
        f"g = runpy.run_path({str(script)!r}, run_name='bench')['main'].__globals__\n"
        "right = g['implementation']\n"
        "def doubled(impl, *args):\n"
        "    fn = right(impl, *args)\n"
        "    return (lambda x, t: 2 * fn(x, t)) if impl == 'dynloss' else fn\n"
        "g['implementation'] = doubled\n"
        "sys.exit(g['main']())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    (report,) = tmp_path.glob("bench_*.json")
    rows = json.loads(report.read_text())["rows"]
    ours = [r for r in rows if r["impl"] == "dynloss"]
    assert ours and all(r["error"].startswith("ValueError: its value differs from the "
                                              "reference's by ") and r["ms"] is None
                        for r in ours), ours
    peers = [r for r in rows if r["impl"] == "torch"]
    assert peers and all(r["max_abs_diff_vs_reference"] < 1e-5 and r["ms"] > 0
                         for r in peers), peers


TABLE_META = {"shape": (1, 1, 4), "dtype": "float32", "cpu": "cpu", "threads": 1, "torch": "t",
              "smp": None, "monai": None, "dynloss": "d", "date": "now", "repeats": 5,
              "sigmoid_ms": 0.1}
"""The run description of the tables the tests render."""


def _bench_cpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cpu", ROOT / "benchmarks" / "bench_cpu.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_cpu_benchmark_separates_calls_that_page_fault():
    """The per-candidate summary: median, minimum, median page faults, and the median over
    the calls without a page fault (None when every call faulted) with their number."""
    bench = _bench_cpu()
    times = [6.0, 3.5, 3.7, 6.2, 3.9]
    faults = [2016, 0, 0, 4032, 0]
    assert bench.summarize(times, faults) == (3.9, 3.5, 0, 3.7, 3)
    assert bench.summarize([2.0, 4.0], [2016, 2016]) == (3.0, 2.0, 2016, None, 0)
    table = bench.to_markdown(
        TABLE_META,
        [{"loss": "dice", "implementation": "monai", "median_ms": 3.9, "min_ms": 3.5,
          "speedup_of_dynloss": 2.0, "saved_inputs": 1.0, "page_faults": 0,
          "no_fault_median_ms": 3.7, "no_fault_calls": 3},
         {"loss": "dice", "implementation": "smp", "median_ms": 3.0, "min_ms": 2.0,
          "speedup_of_dynloss": 1.5, "saved_inputs": 3.0, "page_faults": 2016,
          "no_fault_median_ms": None, "no_fault_calls": 0}])
    assert "| dice | monai | 3.90 | 3.50 | 2.00x | 1.00 | – | 0 | 3.70 (3) |" in table
    assert "| dice | smp | 3.00 | 2.00 | 1.50x | 3.00 | – | 2016 | – |" in table


def test_cpu_benchmark_names_its_results_by_shape_and_losses():
    """Each shape and each subset of losses writes its own result files: a run at another
    shape never replaces the default table."""
    bench = _bench_cpu()
    every = bench.LOSSES
    assert bench.default_name([32, 1, 256, 256], every) == "cpu"
    assert bench.default_name([8, 1, 64, 64], every) == "cpu_8x1x64x64"
    assert bench.default_name([2, 1, 64, 64, 64], every) == "cpu_2x1x64x64x64"
    assert bench.default_name([32, 1, 256, 256], ["topk"]) == "cpu_topk"
    assert bench.default_name([8, 1, 64, 64], ["iou", "dice"]) == "cpu_8x1x64x64_dice_iou"
    assert bench.default_name([32, 1, 256, 256], ["bce_pos_weight"]) == "cpu_bce_pos_weight"
    assert bench.default_name([32, 1, 256, 256], [*every, "bce_pos_weight"]) == (
        "cpu_dice_iou_tversky_focal_bce_topk_bce_pos_weight")


def test_cpu_benchmark_weighs_the_positives_as_each_peer_does():
    """``bce_pos_weight``: BCE with ``pos_weight=3`` against torch's and smp's own weighted
    BCE, every candidate the same value."""
    bench = _bench_cpu()
    logits, target = bench.make_inputs((2, 1, 8, 8))
    candidates = bench.competitors("bce_pos_weight")
    assert {"dynloss[auto]", "torch"} <= set(candidates)
    want = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target, pos_weight=torch.tensor([3.0]))
    for label, fn in candidates.items():
        torch.testing.assert_close(fn(logits, target), want, rtol=2e-6, atol=1e-7, msg=label)


@pytest.mark.parametrize("shape", [(32, 1, 256, 256), (2, 1, 64, 64, 64), (8, 1, 64)])
def test_cpu_benchmark_checks_every_candidate_against_the_reference(shape):
    """Before timing, every candidate's value and gradient on a probe of the shape's rank are
    dynloss's reference's (nnU-Net's TopK too: the probe's count 60 % is an integer), so a
    peer given other arguments cannot be timed as the same loss. The CPU benchmark timed its
    peers unchecked (the GPU one checked). Found by a review."""
    bench = _bench_cpu()
    probe = bench.probe_shape(shape)
    assert probe[0] == 2 and probe[1] == shape[1] and len(probe) == len(shape)
    assert (math.prod(probe) * 0.6) % 1 == 0
    for name in [*bench.LOSSES, *bench.EXTRA_LOSSES]:
        candidates = bench.competitors(name)
        assert len(candidates) > 3 or name == "topk", sorted(candidates)  # the peers are there
        bench.check_candidates(name, candidates, shape)


@pytest.mark.parametrize("wrong", ["value", "gradient"])
def test_cpu_benchmark_refuses_a_peer_that_computes_another_loss(monkeypatch, capsys, tmp_path,
                                                                 wrong):
    bench = _bench_cpu()
    real = bench.competitors

    def competitors(name):
        found = real(name)
        smp = found["smp"]
        if wrong == "value":
            found["smp"] = lambda x, t: smp(x, t) * 1.001
        else:  # the same value, the gradient of the detached sigmoid's sum added
            found["smp"] = lambda x, t: smp(x, t) + (x - x.detach()).sum() * 1e-3
        return found

    monkeypatch.setattr(bench, "competitors", competitors)
    out = tmp_path / "results"
    argv = ["--shape", "2", "1", "8", "8", "--repeats", "1", "--warmup", "0", "--losses",
            "dice", "--out", str(out)]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"bench_cpu.py: error: dice: smp's {wrong} on a (2, 1, 5, 5) probe "
                          "differs from dynloss's reference ("), err
    assert err.endswith("): it would be timed as another loss"), err
    assert not list(tmp_path.iterdir())


def test_cpu_benchmark_tables_written_before_the_peers_were_recorded_name_the_peer_timed():
    """Summaries written before they recorded which peers were timed said "over the faster of
    smp/MONAI" for BCE, where MONAI has no loss and only smp was timed; the rows say which
    were. Found by a review."""
    bench = _bench_cpu()
    row = {"median_ms": 2.0, "min_ms": 2.0, "speedup_of_dynloss": 2.0, "saved_inputs": 1.0,
           "page_faults": 0, "no_fault_median_ms": 2.0, "no_fault_calls": 5}
    rows = [{**row, "loss": "bce", "implementation": "smp"},
            {**row, "loss": "dice", "implementation": "smp"},
            {**row, "loss": "dice", "implementation": "monai"}]
    summaries = {name: {"dynloss_ms": 1.0, "vs_smp_monai": 2.0, "vs_torch": 1.5}
                 for name in ("bce", "dice")}
    table = bench.to_markdown(TABLE_META, rows, summaries)
    assert "- bce: 1.00 ms; 2.00x over smp, 1.50x over plain torch" in table
    assert "- dice: 1.00 ms; 2.00x over the faster of smp/MONAI, 1.50x over plain torch" in table


def test_cpu_benchmark_without_its_peers_refuses_to_replace_the_tables(monkeypatch, capsys):
    """Without smp/MONAI it overwrote the committed tables with no peer rows, silently."""
    bench = _bench_cpu()
    monkeypatch.setattr(bench, "HAVE_MONAI", False)
    before = {path: path.read_bytes() for path in (ROOT / "benchmarks" / "results").glob("cpu*")}
    assert bench.main(["--shape", "1", "1", "4", "4", "--repeats", "1", "--warmup", "0"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        'bench_cpu.py: error: monai not installed (pip install -e ".[test]"); the results would '
        "compare with no peer. Install them, or pass --out to write elsewhere.")
    assert before == {path: path.read_bytes()
                      for path in (ROOT / "benchmarks" / "results").glob("cpu*")}


def test_cpu_benchmark_compares_fault_free_calls_only_when_every_peer_has_them():
    """The ratio over calls without a page fault took the faster of the peers that had such
    calls: where MONAI (the faster) never had one, it was measured against smp, the slower
    peer, and came out above the median ratio (Tversky 12.70x against 7.60x)."""
    bench = _bench_cpu()
    timed = {"smp": (17.71, 15.0, 2016, 15.34, 5), "monai": (9.18, 5.0, 2016, None, 0)}
    assert bench.no_fault_ratio(timed, 1.0) is None
    timed["monai"] = (9.18, 5.0, 0, 8.0, 12)
    assert bench.no_fault_ratio(timed, 2.0) == 4.0
    assert bench.no_fault_ratio(timed, None) is None


@pytest.mark.skipif(not __import__("dynloss").kernels.native_available(),
                    reason="needs the native kernels")
def test_cpu_benchmark_counts_the_memory_dynloss_keeps_between_calls():
    """The pool keeps the native backend's input-sized buffer between calls (resident memory
    the peers do not hold); the table left it out. It is the *kept* column now."""
    from dynloss.kernels.native.buffer_pool import pool_enabled

    bench = _bench_cpu()
    logits, target = bench.make_inputs((1, 1, 512, 512))  # 1 MiB: above the pool's minimum
    candidates = bench.competitors("dice")
    kept = bench.kept_bytes(candidates["dynloss[auto]"], logits, target)
    assert kept == (logits.numel() * 4 if pool_enabled() else 0)
    assert bench.kept_bytes(candidates["torch"], logits, target) == 0
    assert bench.kept_bytes(candidates["dynloss[reference]"], logits, target) == 0
    table = bench.to_markdown(
        TABLE_META,
        [{"loss": "dice", "implementation": "dynloss[auto]", "median_ms": 1.0, "min_ms": 0.9,
          "speedup_of_dynloss": 1.0, "saved_inputs": 1.0, "kept_inputs": 1.0,
          "page_faults": 0, "no_fault_median_ms": 1.0, "no_fault_calls": 5}])
    assert "| dice | dynloss[auto] | 1.00 | 0.90 | 1.00x | 1.00 | 1.00 | 0 | 1.00 (5) |" in table
    assert "*kept*:" in table


def _bench_cuda():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cuda",
                                                  ROOT / "benchmarks" / "bench_cuda.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_cuda"] = bench  # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules["bench_cuda"]
    return bench


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_cuda_benchmark_peers_compute_the_same_loss(mode):
    """Every peer the GPU benchmark times computes dynloss's loss (MONAI's multiclass focal,
    which averages the same terms over the one-hot tensor, times C: it was timed at 1/C of
    ours; nnU-Net's TopK: its count rounded down): a library without the loss is not timed
    for it. smp's multiclass
    FocalLoss (one-vs-rest sigmoid focal) and MONAI's multiclass DiceFocalLoss (whose focal
    term is the sigmoid one whatever ``softmax`` says) are other losses and were timed as
    if they were the same."""
    import monai.losses
    import segmentation_models_pytorch as smp

    bench = _bench_cuda()
    shape = (2, 4, 16, 16) if mode == "multiclass" else (2, 1, 16, 16)
    x, t = bench.make_inputs(mode, shape, torch.float32, torch.device("cpu"))
    timed = []
    for loss in bench.LOSSES:
        want = bench._dynloss(loss, mode, "reference")(x, t).item()
        for impl in ("torch", "smp", "monai", "nnunet"):
            fn = bench.implementation(impl, loss, mode, smp, monai.losses, "reference")
            if fn is None:
                continue
            got = fn(x, t).item()
            rtol = 1e-2 if impl == "nnunet" else 1e-5  # (a count of 307 or 308 of 512)
            assert got == pytest.approx(want, rel=rtol), (loss, impl, got, want)
            timed.append((loss, impl))
    assert ("focal", "smp") in timed or mode == "multiclass"
    assert ("dice", "monai") in timed and ("topk", "nnunet") in timed


def test_cpu_benchmark_names_the_peers_it_compared_with():
    """BCE has no MONAI loss: its ratio is against smp alone, and the table says so (it read
    "the faster of smp/MONAI")."""
    bench = _bench_cpu()
    summaries = {"bce": {"dynloss_ms": 1.0, "vs_smp_monai": 3.0, "peers": ["smp"]},
                 "dice": {"dynloss_ms": 1.0, "vs_smp_monai": 2.5, "peers": ["smp", "monai"]}}
    table = bench.to_markdown(dict(TABLE_META), [], summaries)
    assert "- bce: 1.00 ms; 3.00x over smp" in table
    assert "- dice: 1.00 ms; 2.50x over the faster of smp/MONAI" in table


def test_cpu_benchmark_draws_and_records_its_order_seed(tmp_path, monkeypatch):
    """Every run drew the same orders of the candidates (seed 0), so the ranges over runs
    never saw another order; a run now draws a seed, records it, and ``--seed`` replays it."""
    bench = _bench_cpu()
    seeds = []
    real = bench.time_candidates

    def spy(*args, seed, **kwargs):
        seeds.append(seed)
        return real(*args, seed=seed, **kwargs)

    monkeypatch.setattr(bench, "time_candidates", spy)
    common = ["--shape", "1", "1", "4", "4", "--repeats", "2", "--warmup", "0", "--losses",
              "bce"]
    for run in range(2):
        assert bench.main([*common, "--out", str(tmp_path / f"run{run}")]) in (None, 0)
    assert bench.main([*common, "--seed", "123", "--out", str(tmp_path / "fixed")]) in (None, 0)
    assert seeds[0] != seeds[1] and seeds[2] == 123
    meta = json.loads((tmp_path / "fixed.json").read_text())["meta"]
    assert meta["order_seed"] == 123
    assert "order seed 123" in (tmp_path / "fixed.md").read_text()
