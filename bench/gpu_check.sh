#!/usr/bin/env bash
# Every GPU check in one go, for one lease of a GPU machine:
#   1. the trainer through launch.sh on a tiny BERT and real GLUE rows: rank pruning under bf16 ZeRO-3 and
#      movement pruning under fp16 ZeRO-2 (FusedAdam, NCCL process group), each exported with --verify;
#   2. bench/gpu_efficiency.py: BERT-base and BERT-large at micro-batches 32 and 64 of 128 tokens, mtp's bf16
#      ZeRO-2 / ZeRO-3 path against a plain bf16 PyTorch loop (step time, tokens/s, MFU, peak memory), a
#      torch.profiler table of the BERT-large step, each pruning method's step over dense; collectives.
#
#   bash bench/gpu_check.sh OUT_DIR        (GPU; real GLUE rows with MTP_GLUE_DIR set, else two made-up tasks)
#   SMOKE=1 bash bench/gpu_check.sh OUT_DIR  (the same steps on CPU with fp32 configs: a check of this script)
#
# TOKENIZER names the tokenizer of the random-weight models (default: the packaged MiniLM's, BERT's uncased
# vocabulary). Each step runs even if an earlier one failed; results land in OUT_DIR.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: bash bench/gpu_check.sh OUT_DIR}"
mkdir -p "$out"
tokenizer="${TOKENIZER:-sentence-transformers/all-MiniLM-L6-v2}"
runs=$(mktemp -d)
if [[ -n "${SMOKE:-}" ]]; then
  export DS_ACCELERATOR=cpu
  specs=("rank cpu_zero3 fp32" "movement cpu_zero2 fp32")
else
  nvidia-smi -L
  # DeepSpeed builds FusedAdam on first use and cannot parse arch suffixes ("9.0a"): drop them
  [[ -n "${TORCH_CUDA_ARCH_LIST:-}" ]] && export TORCH_CUDA_ARCH_LIST=$(sed -E 's/([0-9])[a-z]+/\1/g' <<<"$TORCH_CUDA_ARCH_LIST")
  specs=("rank gpu_bf16_zero3 bf16" "movement gpu_fp16_zero2 fp16")
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
python3 -c 'import torch, deepspeed, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
"deepspeed", deepspeed.__version__, "transformers", transformers.__version__)'
for spec in "${specs[@]}"; do
  read -r method ds precision <<<"$spec"
  name="tiny-$method-$precision-${ds##*_}"
  start=$(date +%s)
  bash launch.sh --nproc 1 --config configs/tiny.yaml "encoder.tokenizer=$tokenizer" \
    "train.deepspeed_config=ds_configs/$ds.json" "pruning.method=$method" pruning.budget=0.3 train.max_steps=30 \
    "output_dir=$runs/$name" "${tasks[@]}" && python3 -m mtp export "$runs/$name" --verify
  echo "$name: exit $? after $(( $(date +%s) - start )) s"
  cp "$runs/$name/results.json" "$out/$name.json" 2>/dev/null
done
python3 bench/gpu_efficiency.py ${SMOKE:+--smoke} --out "$out/gpu_efficiency.json"
