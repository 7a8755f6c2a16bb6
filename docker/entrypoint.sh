#!/usr/bin/env bash
# mimscale's per-node launcher: the image's ENTRYPOINT, and what every Slurm task and Kubernetes pod
# runs (docker/slurm/pretrain.sbatch, docker/k8s/*.yaml). On each node it runs
#
#   deepspeed <this node's launcher flags> mimscale/pretrain.py <your arguments, unchanged>
#
# from the repository root, so relative paths in the arguments (ds_configs/..., mimscale/configs/...)
# mean what they mean in the docs (docs/running.md). Example:
#
#   docker/entrypoint.sh --deepspeed_config ds_configs/gpu_bf16_zero1.json \
#       --config mimscale/configs/mae_vit_base.yaml --set data.path=/data/imagenet
#
# The launcher flags come from the environment; the first variable that is set wins:
#   NNODES         nodes in the job: NNODES, SLURM_NNODES; default 1
#   NODE_RANK      this node's index 0..NNODES-1: NODE_RANK, RANK (what the Kubeflow PyTorchJob
#                  operator sets: the pod's index), JOB_COMPLETION_INDEX (an Indexed Job),
#                  SLURM_NODEID; default 0
#   MASTER_ADDR    node 0's address (required when NNODES > 1; default 127.0.0.1)
#   MASTER_PORT    the rendezvous port on node 0 (default 29500)
#   GPUS_PER_NODE  ranks on this node: GPUS_PER_NODE, the entries of CUDA_VISIBLE_DEVICES,
#                  the GPUs `nvidia-smi -L` lists. With CUDA_VISIBLE_DEVICES set (Slurm sets it),
#                  rank i of this node uses its i-th entry.
#   MIMSCALE_OUTPUT_DIR  the run's output_dir (optional; see exit status)
#
# Every node runs DeepSpeed's single-node launcher for its own GPUs (--no_ssh with --node_rank),
# with a generated hostfile that only tells it how many ranks each node has: no ssh between nodes,
# and the same command under Slurm, Kubernetes and docker run.
#
# Stopping: SIGTERM, SIGINT or SIGUSR1 sent to this script (Kubernetes and `docker stop` signal only
# the container's first process, which is this script) becomes one SIGUSR1 to every process the
# launcher started: the ranks save a checkpoint at a step they all agree on and exit 143 (see
# mimscale/runtime/preempt.py). The launcher's own processes start with all three signals ignored and so
# keep waiting for the ranks. Left alone, DeepSpeed's outer launcher has no handler for them (as a
# container's first process it would drop the signal; elsewhere it would die of it, and Slurm would
# end the step while the ranks still save), and its node launcher answers SIGTERM by SIGKILLing the
# ranks 30 s later (it still does when Slurm sends SIGTERM to every process of the step). The
# script returns only once every process it started has exited.
#
# Exit status: the launcher's, 2 for a bad setting here, and 143 for "stopped early, run again to
# resume", which Kubernetes restart policies and the Slurm script's requeue act on. The ranks exit
# 143 themselves when they stopped early (the launcher passes the first non-zero status on); 143 is
# also returned when, after the launcher exited 0, MIMSCALE_OUTPUT_DIR/summary.json says the run stopped on a
# signal before its last step (the signal may have reached another node only: every node stops
# with it), and when a stop signal reached this script and no such summary says otherwise.
set -euo pipefail

STOPPED_EXIT=143
# Once the launcher has exited, seconds to wait for anything it left behind before SIGKILLing it.
DRAIN_SECONDS=${MIMSCALE_DRAIN_SECONDS:-60}
# How long a node other than node 0 waits for MASTER_ADDR to resolve (a headless Service's DNS record
# appears only once the pod behind it exists).
RESOLVE_SECONDS=${MIMSCALE_RESOLVE_SECONDS:-600}

die() {
  echo "mimscale entrypoint: $*" >&2
  exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# torch, Triton and DeepSpeed keep caches under $HOME; enroot/pyxis, Apptainer and OpenShift run the
# image as another user whose home may not exist in it.
if [ -z "${HOME:-}" ] || [ ! -w "$HOME" ]; then
  export HOME=${TMPDIR:-/tmp}
fi

nnodes=${NNODES:-${SLURM_NNODES:-1}}
node_rank=${NODE_RANK:-${RANK:-${JOB_COMPLETION_INDEX:-${SLURM_NODEID:-0}}}}
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-29500}
is_uint "$nnodes" && [ "$nnodes" -ge 1 ] || die "NNODES must be a positive integer, got '$nnodes'"
is_uint "$node_rank" && [ "$node_rank" -lt "$nnodes" ] || die "NODE_RANK must be in 0..$((nnodes - 1)), got '$node_rank'"
is_uint "$master_port" || die "MASTER_PORT must be a port number, got '$master_port'"
if [ -z "$master_addr" ]; then
  [ "$nnodes" -eq 1 ] || die "MASTER_ADDR (node 0's address) is required with NNODES=$nnodes"
  master_addr=127.0.0.1
fi

# This node's device ids, comma-separated.
cvd=${CUDA_VISIBLE_DEVICES:-}
if [ -n "$cvd" ]; then
  # DeepSpeed's node launcher rewrites CUDA_VISIBLE_DEVICES from the hostfile's slot numbers, so
  # only index lists can be carried through (not GPU-/MIG- UUIDs).
  [[ $cvd =~ ^[0-9]+(,[0-9]+)*$ ]] || die "CUDA_VISIBLE_DEVICES='$cvd' is not a list of device indices"
  local_ids=$cvd
  IFS=, read -r -a ids <<<"$cvd"
  ngpus=${#ids[@]}
  if [ -n "${GPUS_PER_NODE:-}" ] && [ "$GPUS_PER_NODE" != "$ngpus" ]; then
    die "GPUS_PER_NODE=$GPUS_PER_NODE but CUDA_VISIBLE_DEVICES='$cvd' lists $ngpus devices"
  fi
else
  ngpus=${GPUS_PER_NODE:-}
  if [ -z "$ngpus" ]; then
    ngpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU ' || true)
  fi
  is_uint "$ngpus" && [ "$ngpus" -ge 1 ] || die "no GPUs found (nvidia-smi -L); set GPUS_PER_NODE (ranks per node)"
  local_ids=$(seq -s, 0 $((ngpus - 1)))
fi
other_ids=$(seq -s, 0 $((ngpus - 1)))  # every node is assumed to run as many ranks as this one

workdir=$(mktemp -d "${TMPDIR:-/tmp}/mimscale-launch.XXXXXX")
trap 'rm -rf "$workdir"' EXIT

# The hostfile's names are labels only (--no_ssh never contacts them); --include picks the device
# ids each node uses, and only this node's entry is acted on here.
hostfile=$workdir/hostfile
include=
for ((i = 0; i < nnodes; i++)); do
  ids_i=$other_ids
  [ "$i" -ne "$node_rank" ] || ids_i=$local_ids
  slots=$(tr , '\n' <<<"$ids_i" | sort -n | tail -n1)
  echo "node-$i slots=$((slots + 1))" >>"$hostfile"
  include+="${include:+@}node-$i:$ids_i"
done

if [ "$nnodes" -gt 1 ] && [ "$node_rank" -gt 0 ]; then
  waited=0
  until getent hosts "$master_addr" >/dev/null; do
    [ "$waited" -lt "$RESOLVE_SECONDS" ] || die "MASTER_ADDR '$master_addr' did not resolve within ${RESOLVE_SECONDS}s"
    sleep 5 || true
    waited=$((waited + 5))
  done
fi

echo "mimscale entrypoint: node $node_rank of $nnodes, $ngpus ranks on devices $local_ids, rendezvous $master_addr:$master_port" >&2

stop=
launcher_pgid=
forward_stop() {
  if [ -n "$launcher_pgid" ]; then
    kill -USR1 -- "-$launcher_pgid" 2>/dev/null || true
  fi
}
# shellcheck disable=SC2329  # called from the traps below, which shellcheck does not follow
on_signal() {
  if [ -z "$stop" ]; then
    echo "mimscale entrypoint: SIG$1: asking the ranks to save a checkpoint and stop" >&2
  fi
  stop=$1
  forward_stop
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal USR1' USR1

# The launcher runs in a session (and process group) of its own, so one kill reaches every process
# it starts, ranks and their data loader workers included, and nothing else; its exit status goes
# through a file because a trapped signal interrupts `wait` in this shell.
(
  trap '' TERM INT USR1
  setsid deepspeed --hostfile "$hostfile" --include "$include" --no_ssh --node_rank "$node_rank" \
    --master_addr "$master_addr" --master_port "$master_port" mimscale/pretrain.py "$@" &
  echo "$!" >"$workdir/pgid"
  rc=0
  wait "$!" || rc=$?
  echo "$rc" >"$workdir/rc"
) &
supervisor=$!
# `|| true` after each sleep: a group-wide SIGTERM (Slurm) also kills the sleep, and under set -e its
# status 143 would end this script before the trap's request reaches the ranks
until [ -s "$workdir/pgid" ] || ! kill -0 "$supervisor" 2>/dev/null; do
  sleep 0.05 || true
done
# a builtin read, not $(cat ...): a group-wide SIGTERM landing on that child would leave it empty
launcher_pgid=""
read -r launcher_pgid <"$workdir/pgid" 2>/dev/null || true
[ -z "$stop" ] || forward_stop  # a signal that came before the launcher existed

while kill -0 "$supervisor" 2>/dev/null; do
  wait "$supervisor" || true
done
rc=$(cat "$workdir/rc" 2>/dev/null || echo 1)

if [ -n "$launcher_pgid" ]; then
  waited=0
  while kill -0 -- "-$launcher_pgid" 2>/dev/null; do
    if [ "$waited" -ge "$DRAIN_SECONDS" ]; then
      echo "mimscale entrypoint: processes of the launcher still running after ${DRAIN_SECONDS}s: killing them" >&2
      kill -KILL -- "-$launcher_pgid" 2>/dev/null || true
      break
    fi
    sleep 1 || true
    waited=$((waited + 1))
  done
fi

summary=${MIMSCALE_OUTPUT_DIR:+$MIMSCALE_OUTPUT_DIR/summary.json}
if [ "$rc" -eq 0 ] && [ -n "$summary" ] && [ -f "$summary" ]; then
  # Written by rank 0 before the final barrier, so it is this invocation's once the launcher exited 0.
  if python3 - "$summary" <<'PY'; then
import json, sys
s = json.load(open(sys.argv[1]))
sys.exit(0 if s.get("stopped_by") and s.get("steps", 0) < s.get("total_steps", 0) else 1)
PY
    echo "mimscale entrypoint: the run stopped early (summary.json: stopped_by); run it again to resume" >&2
    rc=$STOPPED_EXIT
  fi
elif [ -n "$stop" ]; then
  rc=$STOPPED_EXIT
fi
exit "$rc"
