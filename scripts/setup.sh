#!/usr/bin/env bash
# Create ./.venv with a torch/torchvision pair that imports together, then install patchbench.
#   bash scripts/setup.sh         # runtime only
#   bash scripts/setup.sh --dev   # plus test dependencies (pytest, timm)
# Why the care: a local wheel directory (pip's find-links) may hold a CPU-only torch that the
# torchvision on PyPI was not built against (`operator torchvision::nms does not exist`).
# We ignore local wheel directories and pip config for the torch pair and pin a tested pair.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${PATCHBENCH_TORCH:-"torch==2.14.1 torchvision==0.29.2"}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 .venv/bin/python -m pip "$@"; }
if ! .venv/bin/python -c "import torch, torchvision.ops as o; o.nms(torch.zeros(1,4), torch.zeros(1), 0.5)" 2>/dev/null; then
    echo "setup: installing $TORCH_SPEC from PyPI (first run only, ~1-2 min)"
    # shellcheck disable=SC2086
    pip install -q $TORCH_SPEC
fi
pip install -q -e ".$extras"
# build patchbench's CPU operators now (once per source and torch version, into the user's cache), not in
# the first run; where they cannot be built (no C++ compiler) patchbench runs PyTorch's own ops
.venv/bin/python -c "from patchbench.cpu import build; build.load() or print(f'setup: {build.FAILURE}; patchbench will use PyTorch ops')" 2>&1 | grep -v "^W[0-9]" || true
.venv/bin/python -c "import torch, torchvision, patchbench; print(f'setup: ok (torch {torch.__version__}, torchvision {torchvision.__version__}, patchbench {patchbench.__version__})')"
