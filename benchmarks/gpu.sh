#!/usr/bin/env bash
# Every GPU measurement on a box with no network: Python 3.12 with torch, transformers,
# torchvision and Pillow, but no package index, Beam or pydantic (benchmarks/README.md).
#
#   make gpu-bundle            # where the package index is: cp312 wheels into .whl/ (< 60 MiB)
#   bash benchmarks/gpu.sh     # on the box, from the repo root, with .whl/ beside it
#
# Installs .whl/ into $SITE (default /tmp/site) with --no-index, puts src/ first on PYTHONPATH
# (the working tree's captionflow, not the wheel's), then runs `python3 -m benchmarks.gpu "$@"`
# under `timeout` (GPU_BENCH_TIMEOUT, default 450 s), so that the whole script ends within
# 8 minutes. Results go to benchmarks/results/; where $OUT is set (the device tool), the files
# the run wrote there are copied to $OUT as well.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
SITE=${SITE:-/tmp/site}
LIMIT=${GPU_BENCH_TIMEOUT:-450}
PYTHON=${PYTHON:-python3}

shopt -s nullglob
wheels=(.whl/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "no wheels in .whl/: run 'make gpu-bundle' where the package index is, and bring .whl/" >&2
    exit 2
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
export PYTHONPATH="$PWD/src:$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
echo "installed ${#wheels[@]} wheels into $SITE in $((SECONDS - started)) s ($("$PYTHON" -V))"
"$PYTHON" -m benchmarks.bundle check "$SITE" || echo "warning: the bundle check failed; going on" >&2

mkdir -p benchmarks/results
stamp=$(mktemp)
touch -d "@$(($(date +%s) - 1))" "$stamp" # what the run writes is newer
echo "results: benchmarks/results/${OUT:+ (copied to \$OUT)}; time limit ${LIMIT} s"
rc=0
timeout --kill-after=10 "$LIMIT" "$PYTHON" -m benchmarks.gpu "$@" || rc=$?
if [[ -n "${OUT:-}" ]]; then
    find benchmarks/results -maxdepth 1 -type f -newer "$stamp" -exec cp {} "$OUT"/ \;
fi
rm -f "$stamp"
if ((rc == 124 || rc == 137)); then
    echo "benchmarks.gpu stopped at its ${LIMIT} s limit (GPU_BENCH_TIMEOUT)" >&2
elif ((rc != 0)); then
    echo "benchmarks.gpu failed (exit $rc) after $((SECONDS - started)) s in all" >&2
fi
exit "$rc"
