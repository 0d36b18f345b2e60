#!/usr/bin/env bash
# Install jaxlm on every worker of a Cloud TPU VM slice (or of several slices: multislice) and
# start training on all of them; jax.distributed.initialize() finds the coordinator by itself.
# Look first: --dry_run prints every gcloud command and runs none.
#
#   TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_vm.sh --dry_run --config=configs/7b.py --workdir=/mnt/shared/runs/7b
#   TPU=my-v6e ZONE=us-east5-b ACCELERATOR=v6e-256 RUNTIME=v2-alpha-tpuv6e NUM_SLICES=2 \
#       bash launch/tpu_vm.sh --config=configs/7b.py --config.mesh.data=2 --workdir=/mnt/shared/runs/7b
#
# Everything but --dry_run goes to `python -m jaxlm.train` on every worker, quoted, so
# arguments with spaces or quotes arrive as typed. Settings (environment):
#   TPU, ZONE      the TPU VM's name and zone; with NUM_SLICES > 1 the slices are TPU-0 ... TPU-<n-1>
#   PROJECT        gcloud project (default: gcloud's configured one)
#   ACCELERATOR, RUNTIME  when both are set, first ask for the slices as a queued resource named
#                  TPU (e.g. v5p-128 + v2-alpha-tpuv5, v6e-256 + v2-alpha-tpuv6e) and wait until it
#                  is ACTIVE; SPOT=1 asks for spot capacity; DELETE_AFTER=1 deletes it at the end
#   NUM_SLICES     slices joined over the data-center network (default 1); jaxlm's `data` mesh
#                  axis crosses them, so --config.mesh.data must be a multiple of it
#   COMMAND        the jaxlm module run (default jaxlm.train); COMMAND=jaxlm.sweep makes a
#                  single-host slice (v5e-8, v6e-8, v4-8) one sweep worker, its arguments then
#                  jaxlm.sweep's, installing .[tpu,sweep] (README: Hyperparameter sweeps)
#   REPO, REF      git URL cloned on each worker (default: this checkout's origin) and the commit
#                  checked out there (default: this checkout's HEAD)
# The workdir must be storage every worker shares (a Filestore/NFS mount).
#
# Logs: each worker writes its own output to ~/jaxlm-logs/<its hostname>-<RUN_ID>.log (RUN_ID:
# a setting, default the UTC start time; printed first) and streams it here; this machine keeps each slice's stream, every worker's
# lines together, in logs/tpu_vm/<slice>-<RUN_ID>.log. Fetch every worker's own file with
#   gcloud compute tpus tpu-vm scp --worker=all --zone=ZONE 'SLICE:jaxlm-logs/*' logs/tpu_vm/
# When a worker fails: `gcloud ... ssh --worker=all` returns only after every worker's command
# has ended, and `set -e` acts only then; the failed worker's peers stop on their own once JAX's
# coordination service misses it (an error after its heartbeat timeout), but another slice of a
# multislice run could wait longer. So the first slice to fail (non-zero exit) makes this script
# stop the training process on every worker of every slice (SIGTERM, SIGKILL 30 s later, by the
# pid each worker recorded), delete the queued resource if DELETE_AFTER=1, and exit with that
# slice's status. Ctrl-C here does the same.
set -euo pipefail
dry_run=0
args=()
for arg in "$@"; do
  if [[ $arg == --dry_run ]]; then dry_run=1; else args+=("$arg"); fi
done
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
num_slices=${NUM_SLICES:-1}
repo=${REPO:-$(git config --get remote.origin.url || true)}
if [[ -z $repo ]]; then
  no_repo="set REPO to the git URL the workers clone (this checkout has no origin)"
  ((dry_run)) || { echo "$no_repo" >&2; exit 2; }
  echo "# $no_repo"; repo=REPO
fi
ref=${REF:-$(git rev-parse HEAD)}
command=${COMMAND:-jaxlm.train}
extras=tpu; [[ $command == jaxlm.sweep ]] && extras=tpu,sweep
run_id=${RUN_ID:-$(date -u +%Y%m%d-%H%M%S)}
where=(--zone="$ZONE" ${PROJECT:+--project="$PROJECT"})
echo "run $run_id: ${args[*]}"

run() {  # print a command as it would be typed (stdout with --dry_run, else stderr); run it
  if ((dry_run)); then printf '+'; printf ' %q' "$@"; printf '\n'; return; fi
  { printf '+'; printf ' %q' "$@"; printf '\n'; } >&2
  "$@"
}

sq() {  # one word, single-quoted for any POSIX shell on the worker
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

if [[ $num_slices -gt 1 ]]; then
  slices=(); for ((i = 0; i < num_slices; i++)); do slices+=("$TPU-$i"); done
  nodes=(--node-count="$num_slices" --node-prefix="$TPU")
else
  slices=("$TPU"); nodes=(--node-id="$TPU")
fi

if [[ -n ${ACCELERATOR:-} && -n ${RUNTIME:-} ]]; then
  run gcloud compute tpus queued-resources create "$TPU" "${where[@]}" "${nodes[@]}" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" ${SPOT:+--spot}
  state=(gcloud compute tpus queued-resources describe "$TPU" "${where[@]}" --format='value(state.state)')
  if ((dry_run)); then
    run "${state[@]}"  # polled every 30 s until ACTIVE
  else
    until [[ $(run "${state[@]}" | tail -1) == ACTIVE ]]; do sleep 30; done
  fi
fi

megascale=""
if [[ $num_slices -gt 1 ]]; then
  # Slices find each other through worker 0 of the first slice.
  ip=(gcloud compute tpus tpu-vm describe "${slices[0]}" "${where[@]}"
      --format='value(networkEndpoints[0].ipAddress)')
  if ((dry_run)); then run "${ip[@]}"; coordinator=COORDINATOR_IP; else coordinator=$(run "${ip[@]}" | tail -1); fi
  megascale="MEGASCALE_COORDINATOR_ADDRESS=$coordinator:8080 MEGASCALE_NUM_SLICES=$num_slices"
fi

train_args=""
for arg in "${args[@]}"; do train_args+=" $(sq "$arg")"; done

worker_command() {  # $1: the slice's index; POSIX sh, run by each worker's login shell
  cat <<EOF
set -e
mkdir -p ~/jaxlm-logs
[ -d jaxlm ] || git clone -q $(sq "$repo") jaxlm
cd jaxlm && git fetch -q origin && git checkout -q $(sq "$ref")
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q -e '.[$extras]'
log=~/jaxlm-logs/\$(hostname)-$run_id.log
export JAXLM_DISTRIBUTED=1 ${megascale:+$megascale MEGASCALE_SLICE_ID=$1}
: >"\$log"  # there before tail follows it
python -m $command$train_args >>"\$log" 2>&1 &
pid=\$!; echo \$pid > ~/jaxlm-logs/train.pid
tail -n +1 -f --pid=\$pid "\$log" &
wait \$pid
EOF
}

stop_all() {
  trap - INT TERM
  for name in "${slices[@]}"; do
    run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command \
      'p=$(cat ~/jaxlm-logs/train.pid 2>/dev/null) || exit 0; kill -TERM $p 2>/dev/null || exit 0; sleep 30; kill -KILL $p 2>/dev/null; exit 0' || true
  done
  delete_after
}

delete_after() {
  if [[ ${DELETE_AFTER:-0} == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU" "${where[@]}" --force --quiet
  fi
}

if ((dry_run)); then
  for i in "${!slices[@]}"; do run gcloud compute tpus tpu-vm ssh "${slices[$i]}" "${where[@]}" --worker=all --command "$(worker_command "$i")"; done
  echo "# if a slice fails, or on Ctrl-C:"
  stop_all
  exit 0
fi
logs=logs/tpu_vm
mkdir -p "$logs"
start_slice() {  # $1: index; exits with the slice's gcloud status (pipefail)
  run gcloud compute tpus tpu-vm ssh "${slices[$1]}" "${where[@]}" --worker=all \
    --command "$(worker_command "$1")" 2>&1 | tee -a "$logs/${slices[$1]}-$run_id.log"
}
for i in "${!slices[@]}"; do start_slice "$i" & done
trap 'echo "interrupted: stopping every worker"; stop_all; exit 130' INT TERM
for _ in "${slices[@]}"; do
  status=0
  wait -n || status=$?
  if ((status != 0)); then
    echo "a slice failed (exit $status): stopping the training process on every worker"
    stop_all
    exit "$status"
  fi
done
delete_after
echo "done: logs in $logs/*-$run_id.log here and ~/jaxlm-logs/ on each worker"
