#!/usr/bin/env bash
# One virtual environment per peer under benchmarks/peers/.venvs/ (git-ignored), torch 2.13.0
# installed first and pinned by a constraints file, so no peer's requirements pull another
# torch build. dictionary-learning 0.1.0 pins nnsight<0.4 (which pulls torch 2.14 and no
# longer imports with current transformers): it is installed without its dependencies,
# plus what its SAE trainers and run_one.py use (einops, tqdm, numpy); bench.py loads its trainer modules
# without the package __init__ (which imports nnsight for its activation buffer).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
PIP_FLAGS="-q --disable-pip-version-check"
mkdir -p .venvs
echo "torch==2.13.0" > .venvs/constraints.txt
install() {  # name, pip arguments...
  local name=$1; shift
  local venv=.venvs/$name
  [ -f "$venv/.installed" ] && return 0
  rm -rf "$venv"
  $PY -m venv "$venv"
  "$venv/bin/pip" install $PIP_FLAGS torch==2.13.0
  "$venv/bin/pip" install $PIP_FLAGS -c .venvs/constraints.txt "$@"
  "$venv/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  touch "$venv/.installed"
}
install sparsify eai-sparsify==1.3.3
install saelens sae-lens==6.54.12
install dictlearn --no-deps dictionary-learning==0.1.0 einops tqdm numpy
echo "peers installed in $(pwd)/.venvs"
