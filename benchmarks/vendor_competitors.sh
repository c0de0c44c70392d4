#!/usr/bin/env bash
# Copy the smp loss modules and MONAI from this machine's Python into benchmarks/.vendor/
# (git-ignored), so that benchmarks/bench_cuda.py can compare against them on a GPU machine
# that has torch and triton but cannot pip-install them. Pass "benchmarks/.vendor" in the
# device tool's `carry` list. bench_cuda.py uses an installed smp/MONAI first and falls back
# to these copies (smp's `losses` subpackage is self-contained: torch + numpy; MONAI needs
# numpy on the GPU machine).
#
#   PYTHON=/work/main/.venv/bin/python bash benchmarks/vendor_competitors.sh
set -eu
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
DEST=".vendor"
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" - "$DEST" <<'PYEOF'
import importlib.metadata as md
import pathlib
import shutil
import sys

dest = pathlib.Path(sys.argv[1])
import segmentation_models_pytorch.losses as smp_losses
import monai

ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
shutil.copytree(pathlib.Path(smp_losses.__file__).parent, dest / "smp_losses", ignore=ignore)
shutil.copytree(pathlib.Path(monai.__file__).parent, dest / "monai", ignore=ignore)
versions = {"smp": md.version("segmentation-models-pytorch"), "monai": md.version("monai")}
(dest / "VERSIONS").write_text("".join(f"{k} {v}\n" for k, v in versions.items()))
print("vendored", versions, "into", dest.resolve())
PYEOF
du -sh "$DEST"
