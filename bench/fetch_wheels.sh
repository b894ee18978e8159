#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels the device machine lacks (bench/wheels.txt) into .whl/
# (git-ignored), for the device image's Python 3.12 on x86-64. Then carry ".whl" in the device call.
#   bash bench/fetch_wheels.sh [target-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-.whl}
mkdir -p "$target"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
grep -v '^#' bench/wheels.txt | grep . | while read -r requirement; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$target" "$requirement"
done
ls "$target" | wc -l
du -sh "$target"
