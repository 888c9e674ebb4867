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
# Cluster-scale data (the [streaming] extra, litdata). litdata requires torchvision, pinned here to the
# release built for torch 2.13 (else pip may replace torch to satisfy a newer torchvision). Next to a
# CPU-only torch the registry's torchvision does not import (see below), so there litdata goes in
# without it: litdata needs torchvision only to decode images, and our shards hold bytes that
# codeformer_lightning.io decodes.
if python -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
    python -m pip install -q -e ".[streaming]" "torchvision==0.28.*"
else
    python -m pip install -q --no-deps "litdata>=0.2.76,<0.3"
    python -m pip install -q boto3 obstore tifffile  # litdata's other requirements
fi
# Reference implementations the comparison tests check us against (tests/reference_packages.py):
# torchvision's colour functions and the lpips package. Into a folder of their own, never into the
# environment: the registry's torchvision is built for CUDA torch and, next to the CPU torch installed
# here, fails to import, which would take torchmetrics (so Lightning) down with it.
python -m pip install -q --no-deps --upgrade --target .venv/reference "torchvision==0.28.*" "lpips==0.1.4"
