#!/usr/bin/env bash
# Release check: build the sdist and the wheel, install the wheel into a fresh virtual
# environment that has nothing but torch (linked from this one unless FRESH_TORCH=1), and
# import and use every public name there, from a folder outside the repository (python -I:
# neither the repository nor the script's folder is on sys.path). Run from CI (.ci/run) or by
# hand: bash scripts/check_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

$PY -m pip install --quiet build
$PY -m build --outdir "$work/dist" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
# Packaging metadata is current: setuptools warns about nothing deprecated (e.g. a TOML-table
# project.license instead of an SPDX string with license-files).
if grep -E "DeprecationWarning|is deprecated|are deprecated" "$work/build.log"; then
    echo "the build warns about deprecated packaging metadata (above)" >&2
    exit 1
fi
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
assert "dynloss/kernels/native/native_cpu.cpp" in names, "the native kernels' source is missing"
PYEOF

# The sdist holds the package's source and no half of the test suite (tests/test_*.py
# without their helpers did not even import).
$PY - "$sdist" <<'PYEOF'
import sys, tarfile
names = tarfile.open(sys.argv[1]).getnames()
root = names[0].split("/")[0]
assert f"{root}/src/dynloss/kernels/native/native_cpu.cpp" in names, "the native source is missing"
assert f"{root}/src/dynloss/py.typed" in names, "py.typed missing from the sdist"
tests = [n for n in names if n.startswith(f"{root}/tests")]
assert not tests, f"the sdist ships part of the tests: {tests[:3]}"
PYEOF

$PY -m venv "$work/venv"
if [ "${FRESH_TORCH:-0}" = 1 ]; then
    # A second copy of torch (about 5.5 GB with its CUDA libraries): only where disk allows.
    "$work/venv/bin/python" -m pip install --quiet "$TORCH_SPEC"
else
    # The torch this environment already has, and its requirements, linked in (not the
    # extras): see scripts/torch_only_site.py.
    $PY scripts/torch_only_site.py "$work/torch-site"
    site=$("$work/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$work/torch-site" > "$site/torch_only.pth"
    # venv's own old setuptools (Python < 3.12) would shadow the one torch requires.
    "$work/venv/bin/python" -m pip uninstall --quiet --yes setuptools 2>/dev/null || true
fi
# --no-index: torch must already satisfy the wheel's requirements; nothing else is fetched.
"$work/venv/bin/python" -m pip install --quiet --no-index "$wheel"
cp scripts/wheel_smoke.py "$work/"
(cd "$work" && "$work/venv/bin/python" -I wheel_smoke.py)
