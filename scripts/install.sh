#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the package and its test tools.
# torch comes first from its own pinned release (a CPU build where one is on local disk) so that
# pip does not resolve a multi-GB CUDA build as a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# Reference implementations the comparison tests check us against (tests/reference_packages.py):
# torchvision's colour functions and the lpips package. Into a folder of their own, never into the
# environment: the registry's torchvision is built for CUDA torch and, next to the CPU torch installed
# here, fails to import, which would take torchmetrics (so Lightning) down with it.
python -m pip install -q --no-deps --upgrade --target .venv/reference "torchvision==0.28.*" "lpips==0.1.4"
