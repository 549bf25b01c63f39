#!/usr/bin/env bash
# Run HERE (a machine with a package index) before copying the repository to the GPU machine, which downloads
# nothing. benchmarks/gpu.sh needs none of the packages its image lacks (grain, math-verify, tensorboardX, vllm):
# the only optional extra is matplotlib, for the ratio chart gpu_ratios.png; without it the JSON and Markdown are
# complete. This fetches matplotlib and its dependencies the image lacks as Python 3.12 manylinux x86_64 wheels into
# .whl/ (git-ignored); gpu.sh installs them into .whl/site (--no-index, the image's own packages untouched) when
# matplotlib is not importable there.
#
#   bash benchmarks/gpu_wheels.sh            # then copy the repository, .whl/ included, to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
# --no-deps: exactly this list (numpy and packaging are already on the image; never another jax or torch).
python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --dest .whl matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six
ls -1 .whl/*.whl
