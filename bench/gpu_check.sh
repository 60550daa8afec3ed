#!/usr/bin/env bash
# Every GPU check in one go, for one lease of a GPU machine:
#   1. the trainer through launch.sh on a tiny BERT and real GLUE rows: rank pruning under bf16 ZeRO-3 and
#      movement pruning under fp16 ZeRO-2 (FusedAdam, NCCL process group), each exported with --verify;
#   2. with TEACHER set (a finished dense multitask run of the CPU grid, e.g. packed by bench/pack_run.py for a
#      machine without the hub or the MiniLM package) and MTP_GLUE_DIR: the distilled recipe itself, runs of the CPU
#      grid (configs/compare_minilm_distill.yaml, their overrides read from the plan) under bf16 ZeRO-2, started from
#      and distilled from TEACHER: whether the GPU path keeps the quality the CPU path makes. RECIPE_RUNS names them
#      (default mt-magnitude-0.25), one after another; RECIPE_COMPARE_OVERRIDES holds overrides of the compare YAML,
#      one per line, as the CPU studies pass them to `mtp compare` (e.g. issue 34's length study:
#      'multitask_overrides=[train.max_steps=6000, train.eval_every=1500]'); RECIPE_STEPS shortens every run;
#      RECIPE_TIMEOUT bounds each in seconds, and a stopped run keeps its evaluations;
#   3. bench/gpu_efficiency.py: BERT-base and BERT-large at micro-batches 32 and 64 of 128 tokens, mtp's bf16
#      ZeRO-2 / ZeRO-3 path against a plain bf16 PyTorch loop (step time, tokens/s, MFU, peak memory), a
#      torch.profiler table of the BERT-large step, each pruning method's step over dense; collectives
#      (EFFICIENCY_TIMEOUT bounds it in seconds, EFFICIENCY_ARGS narrows it, e.g. "--archs bert-base-uncased";
#      the JSON is written after every section);
#   4. bench/step_overhead.py on the GPU itself (issue 32): operators and host syncs per step of BERT-large, mtp's
#      bf16 ZeRO-2 / ZeRO-3 step and the plain loop, each pruning method over dense (on the paths an accelerator
#      takes), and device memory by phase (engine, forward, backward, step) of ZeRO-2 against ZeRO-3 at world size 1
#      (STEP_TIMEOUT bounds it, 180 s by default; the JSON is written after every section). It runs before (3),
#      which takes the rest of the lease.
#
#   bash bench/gpu_check.sh OUT_DIR        (GPU; real GLUE rows with MTP_GLUE_DIR set, else two made-up tasks)
#   SMOKE=1 bash bench/gpu_check.sh OUT_DIR  (the same steps on CPU with fp32 configs: a check of this script)
#
# TOKENIZER names the tokenizer of the random-weight models (default: the packaged MiniLM's, BERT's uncased
# vocabulary). Each step runs even if an earlier one failed; results land in OUT_DIR. DEADLINE (seconds since the
# epoch) stops every step in time for the script to end by then: a lease's remaining time, spent in the order
# recipe (2), tiny runs (1), efficiency (3).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: bash bench/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
tokenizer="${TOKENIZER:-sentence-transformers/all-MiniLM-L6-v2}"
runs=$(mktemp -d)
if [[ -n "${SMOKE:-}" ]]; then
  export DS_ACCELERATOR=cpu
  specs=("rank cpu_zero3 fp32" "movement cpu_zero2 fp32")
  recipe_ds=ds_configs/cpu_zero0.json
else
  nvidia-smi -L
  # DeepSpeed builds FusedAdam on first use and cannot parse arch suffixes ("9.0a"): drop them
  [[ -n "${TORCH_CUDA_ARCH_LIST:-}" ]] && export TORCH_CUDA_ARCH_LIST=$(sed -E 's/([0-9])[a-z]+/\1/g' <<<"$TORCH_CUDA_ARCH_LIST")
  specs=("rank gpu_bf16_zero3 bf16" "movement gpu_fp16_zero2 fp16")
  recipe_ds=ds_configs/gpu_bf16_zero2.json
fi
tasks=()
if [[ -z "${MTP_GLUE_DIR:-}" ]]; then  # no GLUE on this machine (and no hub): two small made-up tasks instead
  python3 - "$runs" <<'PY'
import random, sys
random.seed(0)
words = {"neg": ["awful", "dull", "bad"], "pos": ["great", "fine", "good"], "a": ["river", "tree"], "b": ["car", "road"]}
for task, labels in (("polarity", ["neg", "pos"]), ("topic", ["a", "b"])):
    for split, n in (("train", 256), ("dev", 64)):
        rows = ["text,label"]
        for i in range(n):
            label = labels[i % 2]
            rows.append(f"sample {i} {' '.join(random.choices(words[label], k=4))},{label}")
        open(f"{sys.argv[1]}/{task}_{split}.csv", "w").write("\n".join(rows) + "\n")
PY
  tasks=("tasks=[{name: polarity, train_file: $runs/polarity_train.csv, dev_file: $runs/polarity_dev.csv, text_columns: [text], label_column: label, labels: [neg, pos]}, {name: topic, train_file: $runs/topic_train.csv, dev_file: $runs/topic_dev.csv, text_columns: [text], label_column: label, labels: [a, b]}]")
fi
# seconds a step may take: its own cap, and no more than is left before DEADLINE (less 15 s to copy results)
cap() { local left=$(( ${DEADLINE:-9999999999} - $(date +%s) - 15 )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
python3 -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'
if [[ -n "${TEACHER:-}" && -n "${MTP_GLUE_DIR:-}" ]]; then
  for run in ${RECIPE_RUNS:-mt-magnitude-0.25}; do
  # the grid's own overrides for the run, its teacher replaced by TEACHER and its DeepSpeed config by this
  # machine's; an encoder folder beside TEACHER (bench/pack_run.py) stands in for the hub or the MiniLM package
  mapfile -t recipe < <(python3 - "$TEACHER" "$recipe_ds" "$run" <<'PY'
import os
import sys
from pathlib import Path

from mtp.compare.config import load_compare_config
from mtp.compare.plan import ComparePlan

teacher, ds_config, run = sys.argv[1:]
compare_overrides = [line for line in os.environ.get("RECIPE_COMPARE_OVERRIDES", "").splitlines() if line.strip()]
cfg = load_compare_config("configs/compare_minilm_distill.yaml", compare_overrides)
plan = ComparePlan.build(cfg, Path(cfg.base))
if run not in plan.by_name:
    sys.exit(f"gpu_check: RECIPE_RUNS: {run!r} is not a run of the plan ({', '.join(sorted(plan.by_name))})")
spec = plan.by_name[run]
replaced = {"encoder.init_from": teacher, "distill.teacher": teacher, "train.deepspeed_config": ds_config,
            "train.checkpoint_every": "1000"}  # checkpoints only cost time here: the machine is given back
overrides = plan.overrides(spec)
for override in overrides:
    key = override.split("=", 1)[0]
    print(f"{key}={replaced[key]}" if key in replaced else override)
starts_from_teacher = any(o.startswith("encoder.init_from=") for o in overrides)
if starts_from_teacher and (Path(teacher) / "encoder").is_dir():
    print(f"encoder.name={teacher}/encoder")
    print("encoder.random_init=true")  # encoder.init_from overwrites every encoder weight
# a run that starts from the pretrained encoder (start_from_pretrained) needs it on this machine: the hub, or the
# packaged MiniLM's wheel carried and installed
PY
  )
  if [[ ${#recipe[@]} -eq 0 ]]; then echo "$run: no recipe (see above)"; continue; fi
  [[ -n "${RECIPE_STEPS:-}" ]] && recipe+=("train.max_steps=$RECIPE_STEPS" "train.eval_every=$RECIPE_STEPS")
  name="minilm-${run#mt-}-distilled"
  start=$(date +%s)
  printf '%s\n' "${recipe[@]}" > "$out/$name.overrides"
  timeout "$(cap "${RECIPE_TIMEOUT:-3600}")" bash launch.sh --nproc 1 --config configs/default.yaml "${recipe[@]}" \
    "output_dir=$runs/$name" > "$out/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start )) s"
  cp "$runs/$name/results.json" "$out/$name.json" 2>/dev/null
  python3 - "$runs/$name/tensorboard" "$out/$name.evals.json" <<'PY'  # every evaluation, also of a stopped run
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
events.Reload()
scores = {tag: {e.step: round(e.value, 2) for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]
          if tag.startswith("dev/") and (tag.endswith("/score") or tag == "dev/mean_score")}
steps = sorted({step for values in scores.values() for step in values})
history = [{"step": step, **{tag.split("/")[1]: values.get(step) for tag, values in scores.items()}} for step in steps]
json.dump(history, open(sys.argv[2], "w"), indent=1)
for row in history:
    print(row)
PY
  done
fi
for spec in "${specs[@]}"; do
  read -r method ds precision <<<"$spec"
  name="tiny-$method-$precision-${ds##*_}"
  start=$(date +%s)
  timeout "$(cap 300)" bash launch.sh --nproc 1 --config configs/tiny.yaml "encoder.tokenizer=$tokenizer" \
    "train.deepspeed_config=ds_configs/$ds.json" "pruning.method=$method" pruning.budget=0.3 train.max_steps=30 \
    "output_dir=$runs/$name" "${tasks[@]}" && timeout "$(cap 120)" python3 -m mtp export "$runs/$name" --verify
  echo "$name: exit $? after $(( $(date +%s) - start )) s"
  cp "$runs/$name/results.json" "$out/$name.json" 2>/dev/null
done
if [[ -n "${SMOKE:-}" ]]; then step_args=(--smoke); else step_args=(--device cuda --models bert-large-uncased --world 1); fi
start=$(date +%s)
timeout "$(cap "${STEP_TIMEOUT:-180}")" python3 bench/step_overhead.py "${step_args[@]}" --zero 2 3 \
  --sections steps pruning memory --out "$out/step_overhead.json" > "$out/step_overhead.log" 2>&1
echo "step_overhead: exit $? after $(( $(date +%s) - start )) s"
timeout "$(cap "${EFFICIENCY_TIMEOUT:-3600}")" python3 bench/gpu_efficiency.py ${SMOKE:+--smoke} ${EFFICIENCY_ARGS:-} \
  --out "$out/gpu_efficiency.json"
