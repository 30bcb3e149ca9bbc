#!/usr/bin/env bash
# Memory a training run of the paper's target sizes would hold, from the
# estimator `fusechat sft` / `dpo` print before their first step (`fusechat
# memory`, config.json alone): Llama-3.1-8B and Gemma-2-9B, full fine-tuning
# in f32 and bf16 and LoRA, with and without gradient checkpointing, one
# sequence of 2,048 tokens per forward pass,
# against one 80 GB GPU. Writes bench/results/memory.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../scripts/env.sh"
[ -x "$FUSECHAT_BIN" ] || { echo "$FUSECHAT_BIN is missing: cargo build --release -p fusechat" >&2; exit 1; }
SHAPE=(--batch 1 --max-len 2048)
LORA=(--lora-rank 16 --lora-alpha 32 --lora-targets all-linear)
out="$HERE/results/memory.md"
{
  echo "# Training memory of 8-9B targets, estimated"
  echo
  echo "\`bench/memory_plans.sh\`, $(date -u +%Y-%m-%d): \`fusechat memory\` (the estimate \`fusechat sft\` and \`dpo\` print, and check against the machine, before their first step) on the configs in \`bench/model-configs/\`, one sequence of 2,048 tokens per forward pass, every token learned, attention as CUDA runs it (scores kept for the backward pass). LoRA: rank 16 on all seven linear layers of every block. Checkpointed: \`--gradient-checkpointing\` (each block keeps only its input; one block at a time holds its activations while it runs again in the backward pass). bf16 (\`--dtype bf16\`): weights, gradients and activations in bf16, AdamW's two moments in f32 (8 bytes a trained parameter), and with \`--master-weights\` an f32 copy of every weight (4 more). One 80 GB GPU holds a run whose total is under about 75 GB (CUDA context and allocator slack)."
  echo
  echo "| model | training | weights | gradients | optimizer state | activations | logits | backward | total | one 80 GB GPU |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
  for model in llama-3.1-8b gemma-2-9b; do
    for mode in "full f32" "full bf16" "full bf16, checkpointed" "full bf16 + f32 masters, checkpointed" "LoRA bf16" "LoRA bf16, checkpointed"; do
      args=(--model "$HERE/model-configs/$model" "${SHAPE[@]}")
      [[ "$mode" == *bf16* ]] && args+=(--dtype bf16)
      [[ "$mode" == LoRA* ]] && args+=("${LORA[@]}")
      [[ "$mode" == *checkpointed ]] && args+=(--gradient-checkpointing)
      [[ "$mode" == *masters* ]] && args+=(--master-weights)
      line="$("$FUSECHAT_BIN" memory "${args[@]}")"
      # "... weights 16.06 GB, gradients ..., total 123.45 GB"
      python3 - "$model" "$mode" "$line" <<'PY'
import re, sys
model, mode, line = sys.argv[1:]
num = lambda key: float(re.search(key + r" ([0-9.]+) GB", line).group(1))
cols = ["weights", "gradients", "optimizer state", "activations", "logits", "backward", "total"]
vals = [num(c) for c in cols]
fits = "fits" if vals[-1] <= 75 else "does not fit"
print(f"| {model} | {mode} | " + " | ".join(f"{v:.1f} GB" for v in vals) + f" | {fits} |")
PY
    done
  done
} > "$out"
cat "$out"
