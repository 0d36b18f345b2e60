#!/usr/bin/env bash
# Run jaxlm as N processes on this machine, joined by jax.distributed: the same engine a
# TPU pod or GPU cluster uses, for trying multi-host behaviour on one box.
#
#   bash launch/local.sh 2 --config=configs/tiny.py --workdir=runs/tiny-2proc
#
# On a CPU-only machine each process simulates DEVICES_PER_PROCESS devices (default 4).
set -euo pipefail
n=${1:?usage: launch/local.sh NUM_PROCESSES [jaxlm.train flags...]}
shift
port=${JAXLM_PORT:-$((20000 + RANDOM % 20000))}
devices=${DEVICES_PER_PROCESS:-4}
pids=()
for ((i = 0; i < n; i++)); do
  JAXLM_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS="localhost:$port" JAX_NUM_PROCESSES="$n" \
  JAX_PROCESS_ID="$i" XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" \
    python -m jaxlm.train "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
