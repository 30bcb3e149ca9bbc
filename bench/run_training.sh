#!/usr/bin/env bash
# Side-by-side training benchmark: the same SFT and DPO steps on SmolLM2-135M
# (float32, full fine-tune, AdamW, sequence length <= 512), and LoRA SFT
# (rank 16, alpha 32, every linear layer), in PyTorch + transformers (+ peft)
# and in fusechat, one after the other in one run, on the same rows. fusechat
# runs as built (candle's gemm crate), and SFT and DPO again with Intel MKL's
# sgemm (pip `mkl`, the BLAS PyTorch's CPU products use, loaded at run time),
# and SFT with --gradient-checkpointing. Writes bench/results/training.md and
# training.json.
#
# Usage: bench/run_training.sh            (STEPS=5 by default)
# Environment: STEPS, MODEL (a Hugging Face folder; default the imported SmolLM2)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
source "$REPO/scripts/env.sh"
STEPS="${STEPS:-5}"
MODEL="${MODEL:-$FUSECHAT_HOME/test-imported/smollm2-135m-instruct}"
[ -f "$MODEL/model.safetensors" ] || { echo "$MODEL is missing: run scripts/test.sh (its import test writes it)" >&2; exit 1; }
[ -x "$FUSECHAT_BIN" ] || { echo "$FUSECHAT_BIN is missing: cargo build --release -p fusechat" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PY="python3 $HERE/training_bench.py"
T="/usr/bin/time -v -o"

python3 -m pip install -q --disable-pip-version-check mkl
MKL="$(python3 -c 'import glob, sys; print(sorted(glob.glob(sys.prefix + "/lib/libmkl_rt.so.*"))[-1])')"
# The default runs keep candle's gemm even where MKL is installed.
export FUSECHAT_MKL=none
$PY prepare --model "$MODEL" --out "$WORK" --steps "$STEPS"
# SFT: batch 4 sequences per step; DPO: 2 pairs (4 sequences) per step.
$T "$WORK/torch-sft.time" $PY torch-sft --model "$MODEL" --data "$WORK/sft.jsonl" --steps "$STEPS" --batch 4 --json "$WORK/torch-sft.json"
SFT=(sft --model "$MODEL" --data "$WORK/sft.jsonl" --max-steps "$STEPS" --epochs 1 --batch 4 --grad-accum 1 --max-len 512
  --warmup-ratio 0 --checkpoint-every 0 --on-bad-input fail --save-dtype bf16)
$T "$WORK/fusechat-sft.time" "$FUSECHAT_BIN" "${SFT[@]}" --out "$WORK/fusechat-sft"
FUSECHAT_MKL="$MKL" $T "$WORK/fusechat-sft-mkl.time" "$FUSECHAT_BIN" "${SFT[@]}" --out "$WORK/fusechat-sft-mkl"
$T "$WORK/fusechat-sft-gc.time" "$FUSECHAT_BIN" "${SFT[@]}" --out "$WORK/fusechat-sft-gc" --gradient-checkpointing
$T "$WORK/torch-dpo.time" $PY torch-dpo --model "$MODEL" --data "$WORK/dpo.jsonl" --steps "$STEPS" --batch 2 --beta 0.1 --lr 1e-6 --json "$WORK/torch-dpo.json"
DPO=(dpo --model "$MODEL" --data "$WORK/dpo.jsonl" --max-steps "$STEPS" --epochs 1 --batch 2 --grad-accum 1 --max-len 512
  --warmup-ratio 0 --checkpoint-every 0 --on-bad-input fail --loss sigmoid --beta 0.1 --lr 1e-6 --save-dtype bf16)
$T "$WORK/fusechat-dpo.time" "$FUSECHAT_BIN" "${DPO[@]}" --out "$WORK/fusechat-dpo"
FUSECHAT_MKL="$MKL" $T "$WORK/fusechat-dpo-mkl.time" "$FUSECHAT_BIN" "${DPO[@]}" --out "$WORK/fusechat-dpo-mkl"
LORA="--lora-rank 16 --lora-alpha 32 --lora-targets all-linear"
$T "$WORK/torch-lora-sft.time" $PY torch-sft --model "$MODEL" --data "$WORK/sft.jsonl" --steps "$STEPS" --batch 4 --lr 1e-4 \
  --lora 16 --lora-alpha 32 --json "$WORK/torch-lora-sft.json"
$T "$WORK/fusechat-lora-sft.time" "$FUSECHAT_BIN" sft --model "$MODEL" --data "$WORK/sft.jsonl" --out "$WORK/fusechat-lora-sft" \
  --max-steps "$STEPS" --epochs 1 --batch 4 --grad-accum 1 --max-len 512 --warmup-ratio 0 --checkpoint-every 0 --on-bad-input fail \
  --lr 1e-4 $LORA
SETUP="$(date -u +%Y-%m-%d), $(nproc) CPU cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), model $(basename "$MODEL") float32, $STEPS steps each; the first step is excluded from the means (warm-up). fusechat's products run on candle's gemm crate, or on MKL $(python3 -c 'import importlib.metadata as m; print(m.version("mkl"))') where the row says so. SFT: 4 sequences of 440-512 tokens per step (LoRA SFT: the same, rank 16, alpha 32, all seven linear layers of every block, lr 1e-4); DPO: 2 pairs (4 sequences) per step, sigmoid loss, reference log-probs computed once before the steps (not timed). Peak RSS of the whole process (/usr/bin/time), including model load and the final save."
$PY report --dir "$WORK" --results "$HERE/results" --setup "$SETUP"
