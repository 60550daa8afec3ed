#!/usr/bin/env bash
# Launch an mtp job with the `deepspeed` launcher, on one machine or several.
#
#   bash launch.sh [launcher options] [--config FILE] [--resume] [dotted.key=value ...]
#
# Launcher options:
#   --nproc N          processes per node: GPUs on a GPU node, CPU ranks otherwise (default: all GPUs, or 2 on CPU)
#   --hostfile FILE    several nodes (format: hostfile.example); ssh to each host unless --no_ssh
#   --no_ssh           start this node only: run launch.sh on every node with its own --node_rank
#   --node_rank R      this node's rank in the hostfile (with --no_ssh)
#   --master_addr A    address of node 0 (default: 127.0.0.1 on one node)
#   --master_port P    rendezvous port (one node: a free port is picked, and a given one that is taken is refused;
#                      several nodes: 29500)
#   --command CMD      mtp sub-command to run on every rank (default: train)
# Everything else goes to `mtp CMD`: --config, --resume and dotted overrides.
# The config is checked once before any process starts; a bad config exits with code 2.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

nproc=""; hostfile=""; no_ssh=0; node_rank=""; master_addr=""; master_port="${MASTER_PORT:-}"
command="train"; config="configs/default.yaml"; resume=""; passthrough=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc|--num_gpus) nproc="$2"; shift 2 ;;
    --hostfile) hostfile="$2"; shift 2 ;;
    --no_ssh) no_ssh=1; shift ;;
    --node_rank) node_rank="$2"; shift 2 ;;
    --master_addr) master_addr="$2"; shift 2 ;;
    --master_port) master_port="$2"; shift 2 ;;
    --command) command="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --config=*) config="${1#--config=}"; shift ;;
    --resume) resume="--resume"; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) passthrough+=("$1"); shift ;;
  esac
done

PYTHON="${PYTHON:-python3}"
# DS_ACCELERATOR=cpu says there is no GPU to look for (and saves starting torch once more)
if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then
  gpus=0
else
  gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
fi
if [[ "$gpus" == "0" ]]; then
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
  nproc="${nproc:-2}"
  cores=$(nproc)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}"
else
  nproc="${nproc:-$gpus}"
fi

# World size: processes per node times nodes (a hostfile's slots when --nproc is not given).
if [[ -n "$hostfile" ]]; then
  [[ -f "$hostfile" ]] || { echo "launch.sh: error: hostfile not found: $hostfile" >&2; exit 2; }
  # every line is 'host slots=N' (DeepSpeed's format), a comment or blank: anything else is named here, not in a
  # DeepSpeed traceback after the launcher has started
  lineno=0
  while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%%#*}"
    [[ -z "${line//[[:space:]]/}" ]] && continue
    if ! [[ "$line" =~ ^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[1-9][0-9]*[[:space:]]*$ ]]; then
      echo "launch.sh: error: $hostfile line $lineno: expected 'HOST slots=N', got '${line%"${line##*[![:space:]]}"}'" >&2
      exit 2
    fi
  done < "$hostfile"
  nodes=$(grep -cE '^[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$hostfile" || true)
  [[ "$nodes" -gt 0 ]] || { echo "launch.sh: error: $hostfile: no 'host slots=N' lines" >&2; exit 2; }
  world=$(( nodes * nproc ))
  if [[ $no_ssh -eq 1 && -z "$node_rank" ]]; then
    echo "launch.sh: error: --no_ssh needs --node_rank (this node's line in $hostfile, from 0)" >&2; exit 2
  fi
  # without ssh nobody can ask node 0 for its address: default to the hostfile's first host
  [[ $no_ssh -eq 1 && -z "$master_addr" ]] && master_addr=$(grep -oE '^[^#[:space:]]+' "$hostfile" | head -1)
else
  world=$nproc
fi

# The rendezvous port. On one node a second job must not die on the first one's port (EADDRINUSE in a DeepSpeed
# traceback): a free port is picked unless one is given, and a given port that is taken is refused here. Several
# nodes must agree on theirs without asking each other: 29500 unless given.
if [[ -z "$hostfile" ]]; then
  if [[ -z "$master_port" ]]; then
    master_port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  elif ! "$PYTHON" - "$master_port" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port left in TIME_WAIT is free; a listening one is not
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except (OSError, ValueError, OverflowError):
    sys.exit(1)
PY
  then
    echo "launch.sh: error: --master_port $master_port is taken (another job on this machine?): give a free port," \
         "or leave --master_port out and a free one is picked" >&2
    exit 2
  fi
else
  master_port="${master_port:-29500}"
fi

# Check everything that can be checked before any process group starts (exit 2 on a bad input).
if [[ "$command" == "train" ]]; then
  "$PYTHON" -m mtp check --config "$config" --world-size "$world" $resume "${passthrough[@]}" || exit $?
fi

launcher=(deepspeed --master_port "$master_port" --num_gpus "$nproc")
[[ -n "$hostfile" ]] && launcher+=(--hostfile "$hostfile") || launcher+=(--hostfile /dev/null)
[[ -n "$master_addr" ]] && launcher+=(--master_addr "$master_addr")
[[ $no_ssh -eq 1 ]] && launcher+=(--no_ssh --node_rank "$node_rank")
exec "${launcher[@]}" --no_local_rank --module mtp "$command" --config "$config" $resume "${passthrough[@]}"
