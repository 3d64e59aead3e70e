#!/usr/bin/env bash
# `flatness bench gpu` on a fresh GPU machine, offline, from a copy of this repository:
#
#     bash benchmarks/gpu_check.sh [extra flatness bench gpu options, e.g. --budget-s 300]
#
# One command, at most ~8 minutes (the bench's own --budget-s, default 420 s, plus start-up).
# It needs a Python whose torch sees a CUDA device, with numpy, scipy, scikit-learn, matplotlib
# and tqdm importable: on the lent GPU machines the image's `python3` has all of them (it is
# used as it is; set PYTHON=... to choose another). Nothing is downloaded and nothing is
# installed: flatness runs from this checkout's src/ (PYTHONPATH), because `pip install` would
# refuse the image's torch where it is older than the pin in constraints.txt, and there is no
# registry to fetch another. The JSON (gpu-DATE-DEVICE.json) and the log (gpu-check.log) go to
# $OUT when it is set (the device tool's folder that comes back), else to benchmarks/; the JSON
# is rewritten after each phase, so a run stopped from outside keeps what it measured.
# Exit status: the bench's (0 all correct, 1 a correctness case failed, 2 no CUDA / bad input).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
dest="${OUT:-benchmarks}"
mkdir -p "$dest" || exit 2

need_cuda=1
for arg in "$@"; do [ "$arg" = "--dry-run" ] && need_cuda=0; done  # the CPU rehearsal of this script
check="import sys, torch, numpy, scipy, sklearn, matplotlib, tqdm
sys.exit(0 if torch.cuda.is_available() or not $need_cuda else 3)"
python=""
for candidate in ${PYTHON:-} python3 /opt/torch/.venv/bin/python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "$check" >/dev/null 2>&1; then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    echo "gpu_check: no Python here has torch with CUDA plus numpy, scipy, scikit-learn, matplotlib and tqdm (set PYTHON=...)" >&2
    exit 2
fi

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FLATNESS_OFFLINE=1
{
    echo "gpu_check: $("$python" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "CUDA", torch.version.cuda)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
} | tee "$dest/gpu-check.log"
"$python" -m flatness bench gpu --out "$dest" "$@" 2>&1 | tee -a "$dest/gpu-check.log"
exit "${PIPESTATUS[0]}"
