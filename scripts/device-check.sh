#!/usr/bin/env bash
# The GPU check, one command on a machine with an NVIDIA GPU (and the network, for the first setup):
#   bash scripts/device-check.sh [RESULTS_DIR]      (default device-check-results/)
# 1. whether torch 2.0.1's CUDA build (the libtorch arcana links) runs on this GPU at all;
# 2. a release build of the binaries;
# 3. parity on the GPU: each language preset's checkpoint, the PyTorch reference run on cuda in fp32,
#    fp16 and bf16, arcana-parity on cuda in the same dtype (bit-identical stages counted; floats need
#    cosine >= 0.9999, ids exact);
# 4. a split with CPU offload: the cli-tiny checkpoints' greedy ids on cuda:0 alone, split over
#    cuda:0 and the CPU (--device-map), and balanced by --device cuda, must be equal;
# 5. speed: parity/bench/bench.py with both sides on cuda in fp16 on a 7B-shaped checkpoint (32 decoder
#    layers at Vicuna-7B width, fp16 on disk), time to first token and decode, PyTorch (HF generate)
#    against arcana in one run.
# Every step writes its output to RESULTS_DIR; summary.txt has one line per step. Steps after a failed
# one still run where they can. Set DEVICE_CHECK_LAYERS to bench fewer decoder layers when time is short.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-device-check-results}"
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }
started=$(date +%s)

bash scripts/setup-python.sh || { note "setup: scripts/setup-python.sh failed"; exit 1; }
source scripts/env.sh
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

echo "== 1. torch 2.0.1 on this GPU"
python - > "$out/torch-cuda.json" <<'EOF'
import json, torch
r = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
try:
    r.update(arch_list=torch.cuda.get_arch_list(), device=torch.cuda.get_device_name(0),
             capability=list(torch.cuda.get_device_capability(0)), count=torch.cuda.device_count())
    a = torch.randn(512, 512, device="cuda", dtype=torch.float16)
    checks = {"fp16 matmul": (a @ a).float().sum().item(), "bf16 matmul": (a.bfloat16() @ a.bfloat16()).float().sum().item(),
              "fp32 matmul": (a.float() @ a.float()).sum().item(), "softmax": torch.softmax(a, -1).float().sum().item()}
    torch.cuda.synchronize()
    r.update(kernels_ok=True, checks=checks)
except Exception as e:  # noqa: BLE001 (the message is the result)
    r.update(kernels_ok=False, error=f"{type(e).__name__}: {e}")
print(json.dumps(r, indent=1))
EOF
if ! python -c "import json,sys; sys.exit(0 if json.load(open('$out/torch-cuda.json')).get('kernels_ok') else 1)"; then
  note "torch-cuda: torch 2.0.1's CUDA build does not run on this GPU: $(python -c "import json; print(json.load(open('$out/torch-cuda.json')).get('error', 'no CUDA device'))")"
  note "torch-cuda: arcana links libtorch 2.0.x (tch 0.13); see README 'GPUs' for the options"
  exit 1
fi
note "torch-cuda: $(python -c "import json; r=json.load(open('$out/torch-cuda.json')); print(r['device'], 'sm_%d%d' % tuple(r['capability']), 'x', r['count'], '; wheel archs', ' '.join(r['arch_list']))")"

echo "== 2. release build"
if cargo build --release --workspace --bins > "$out/build.log" 2>&1; then
  note "build: ok ($(( $(date +%s) - started )) s so far)"
else
  note "build: failed (see build.log)"; exit 1
fi

echo "== 3. parity on cuda"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for preset in lm-mha lm-gqa; do
  python parity/export.py make-checkpoint --preset "$preset" --out "$work/$preset" > /dev/null || { note "parity $preset: checkpoint failed"; continue; }
  for dtype in fp32 fp16 bf16; do
    ref="$work/$preset-$dtype.safetensors"
    if ! python parity/export.py reference --checkpoint "$work/$preset" --out "$ref" --case image-long \
        --device cuda --dtype "$dtype" > "$out/reference-$preset-$dtype.log" 2>&1; then
      note "parity $preset $dtype: the PyTorch reference failed on cuda (reference-$preset-$dtype.log)"; continue
    fi
    target/release/arcana-parity --checkpoint "$work/$preset" --reference "$ref" --device cuda --dtype "$dtype" \
      --min-cosine 0.9999 --json > "$out/parity-$preset-$dtype.json" 2> "$out/parity-$preset-$dtype.log"
    rc=$?
    note "parity $preset $dtype: $(python - "$out/parity-$preset-$dtype.json" "$rc" <<'EOF'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:  # noqa: BLE001
    print(f"no report ({e}); exit {sys.argv[2]}"); sys.exit()
t = r["tensors"]
bits = sum(1 for x in t if x.get("bit_identical"))
floats = [x for x in t if x.get("cosine") is not None and x["name"] != "greedy.ids"]
worst = min(floats, key=lambda x: x["cosine"]) if floats else None
ids = next((x for x in t if x["name"] == "greedy.ids"), None)
print(f"{'ok' if not r.get('first_failure') else 'FAILED at ' + r['first_failure']}; {bits}/{len(t)} tensors bit-identical; "
      f"lowest cosine {worst['cosine']:.6f} ({worst['name']}); greedy ids {'equal' if ids and ids.get('bit_identical') else 'DIFFER'}"
      if worst else f"exit {sys.argv[2]}")
EOF
)"
  done
done

echo "== 4. split with CPU offload"
python parity/cli_fixtures.py --out "$work/cli" > /dev/null 2>&1 || note "split: cli fixtures failed"
model="$work/cli/arcana-cli-tiny-v1"
layers=$(python -c "import json; print(json.load(open('$model/config.json'))['num_hidden_layers'])" 2>/dev/null || echo 2)
last=$((layers - 1))
for run in "single:--device cuda:0" "offload:--device-map cuda:0=0-$((last - 1)),cpu=$last-$last" "auto:--device cuda"; do
  name=${run%%:*}; flags=${run#*:}
  # shellcheck disable=SC2086
  target/release/arcana --model-path "$model" --image-file "$work/cli/images/square.png" --prompt "What is in this image?" \
    --temperature 0 --max-new-tokens 24 --json $flags > "$out/split-$name.json" 2> "$out/split-$name.log"
done
note "split: $(python - "$out" <<'EOF'
import json, sys
ids = {}
for name in ("single", "offload", "auto"):
    try:
        ids[name] = json.load(open(f"{sys.argv[1]}/split-{name}.json"))["turns"][0]["output_ids"]
    except Exception as e:  # noqa: BLE001
        ids[name] = f"failed ({e})"
same = all(ids[n] == ids["single"] for n in ids)
print(("ids equal on cuda:0, split over cuda:0 + cpu, and --device cuda" if same else f"ids DIFFER: {ids}"))
EOF
)"

echo "== 5. speed on cuda (fp16)"
python parity/bench/bench.py --device cuda --dtype fp16 --checkpoint-dtype fp16 --llm-layers "${DEVICE_CHECK_LAYERS:-32}" \
  --modes pytorch,exact --binary target/release/arcana --out "$out/bench-cuda.json" > "$out/bench-cuda.md" 2> "$out/bench-cuda.log" \
  && note "bench: $(grep -m1 -A0 '^| PyTorch' "$out/bench-cuda.md") / $(grep -m1 '^| arcana' "$out/bench-cuda.md")" \
  || note "bench: failed (bench-cuda.log)"
note "total: $(( $(date +%s) - started )) s"
