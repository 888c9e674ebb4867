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
# The default face detector (MTCNN) loads the weight files shipped in this wheel; its code and its
# pinned dependencies are not used, hence --no-deps.
python -m pip install -q --no-deps facenet-pytorch==2.6.0
