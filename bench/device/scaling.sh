#!/usr/bin/env bash
# On the many-core device machine: the issue's 1-14 process scaling curve.
# Needs bench/device/prepare.sh run here first, and the device tool's
# run(command="bash bench/device/scaling.sh", carry=["bench/device/wheels"]).
# Results go to $OUT (scaling.md, scaling.json, the run's stderr).
# PROCESSES, TASKS and REPEATS override the defaults below; the default run
# takes about 5 minutes on 16 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels="$PWD/bench/device/wheels"
out=${OUT:-/tmp/scaling-out}
site=/tmp/scrapeq-site
mkdir -p "$out"
python3 -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl
chmod +x "$wheels/redis-server"
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
{ nproc; python3 --version; "$wheels/redis-server" --version; } | tee "$out/machine.txt"
python3 -m bench.run --workloads scaling \
    --processes "${PROCESSES:-1,2,4,8,14}" --tasks "${TASKS:-30000}" --repeats "${REPEATS:-1}" \
    --redis-server "$wheels/redis-server" --json "$out/scaling.json" \
    2> >(tee "$out/scaling.err" >&2) | tee "$out/scaling.md"
