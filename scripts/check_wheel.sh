#!/usr/bin/env bash
# Release check: build the sdist and the wheel, install the wheel into a fresh virtual
# environment that has nothing but torch, and import and use every public name there, from a
# folder outside the repository (python -I: neither the repository nor the script's folder is
# on sys.path). Run from CI (.ci/run) or by hand: bash scripts/check_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

$PY -m pip install --quiet build
$PY -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/dynloss-*.whl)
sdist=$(ls "$work"/dist/dynloss-*.tar.gz)
echo "built $(basename "$sdist") and $(basename "$wheel")"

# The wheel holds the package (with py.typed) and nothing else.
$PY - "$wheel" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
top = {n.split("/")[0] for n in names}
unexpected = {t for t in top if t != "dynloss" and not t.endswith(".dist-info")}
assert not unexpected, f"unexpected top-level entries in the wheel: {sorted(unexpected)}"
assert "dynloss/py.typed" in names, "py.typed missing from the wheel"
assert "dynloss/kernels/native_cpu.cpp" in names, "the native kernels' source is missing"
PYEOF

$PY -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$work/venv/bin/python" -m pip install --quiet "$wheel"
cp scripts/wheel_smoke.py "$work/"
(cd "$work" && "$work/venv/bin/python" -I wheel_smoke.py)
