#!/usr/bin/env bash
# Install jaxlm on every worker of a TPU VM slice and start training on all of them.
# jax.distributed.initialize() finds the coordinator by itself on TPU VMs.
#
#   TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_vm.sh --config=configs/7b.py --workdir=runs/7b
#
# REPO (default: this checkout's origin URL) is cloned on each worker; the workdir must be
# on storage all workers share (e.g. a Filestore/NFS mount).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
repo=${REPO:-$(git config --get remote.origin.url)}
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d jaxlm ] || git clone $repo jaxlm
  cd jaxlm && git pull --ff-only
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e '.[tpu]'
  JAXLM_DISTRIBUTED=1 python -m jaxlm.train$args
"
