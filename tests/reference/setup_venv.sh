#!/usr/bin/env bash
# Make (or bring up to date) the Python venv of the PyTorch oracle, OUTSIDE the repository.
#
#   tests/reference/setup_venv.sh            # venv at $STEER_REF_VENV, else ~/.cache/steer/ref-venv
#   tests/reference/setup_venv.sh DIR        # venv at DIR
#
# Idempotent: an existing venv is reused and pip only installs what is missing or differs from
# requirements.txt. Prints the venv's python at the end; export STEER_REF_VENV=DIR so that
# steer-bench and the fixture scripts' README commands find it.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-${STEER_REF_VENV:-$HOME/.cache/steer/ref-venv}}"
python="${PYTHON:-python3}"

case "$(cd "$(dirname "$venv")" 2>/dev/null && pwd)/" in
    "$repo"/*) echo "setup_venv.sh: refusing to put the venv inside the repository ($venv)" >&2; exit 2 ;;
esac

if [ ! -x "$venv/bin/python" ]; then
    echo "creating venv at $venv (with $("$python" --version 2>&1))"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
fi

# Already satisfied? (pip would check too, but slowly and noisily for torch's many packages.)
if "$venv/bin/python" - "$here/requirements.txt" <<'PY'
import sys
from importlib.metadata import version, PackageNotFoundError
ok = True
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, want = line.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        have = None
    # torch reports e.g. 2.15.0+cu132: the local tag does not matter.
    if have is None or have.split("+")[0] != want:
        print(f"  {name}: want {want}, have {have}")
        ok = False
sys.exit(0 if ok else 1)
PY
then
    echo "requirements already satisfied in $venv"
else
    "$venv/bin/python" -m pip install --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install -r "$here/requirements.txt"
fi

"$venv/bin/python" -c 'import torch, diffusers, transformers, safetensors, numpy; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
echo "venv ready: $venv/bin/python"
