#!/usr/bin/env bash
# The rows a reader needs first, on one GPU in under 5 minutes, on a bare GPU check node as it is
# (../shared/PLATFORM.md, 'The GPU check node': its own python3 = Python 3.12 with torch, timm, numpy,
# pillow, opencv; no network, no `make setup`, no FFCV). From the repository root:
#
#   bash benchmarks/gpu_wheels.sh                  # here, with network: wheels/ (~7 MiB) for the node
#   bash benchmarks/gpu_quick.sh                   # there: the rows below, into $OUT or runs/gpu_quick/
#   bash benchmarks/gpu_quick.sh --dry-run         # the commands and cases, nothing run (no GPU needed)
#   QUICK_TINY=1 SKIP_INSTALL=1 PYTHON=.venv/bin/python bash benchmarks/gpu_quick.sh   # the plumbing on a CPU
#
# 1. Installs the wheels brought along (WHEELS=, default wheels/: deepspeed, webdataset, simplejpeg and
#    their dependencies) with `pip install --no-index --find-links` into a venv made with
#    --system-site-packages (the node's torch and timm stay; VENV=, default under $TMPDIR), or into
#    the user site when no venv can be made. SKIP_INSTALL=1: use $PYTHON as it is.       (~20 s)
# 2. Writes N_IMAGES (400) synthetic ImageNet-like JPEGs (about 500 x 375, 10 class folders, smooth
#    content plus grain, quality 90) and WebDataset shards of them (python -m data_prep.wds) under
#    WORK= (default under $TMPDIR; kept for a rerun).                                    (~10 s)
# 3. Runs the rows (python -m benchmarks.gpu --case ...; bf16, ZeRO-1, micro batch 128 per GPU, the
#    presets' recipes, 3 warm-up + 8 timed steps; each row is a fresh process: ~10 s of imports and
#    engine set-up before its steps; the times are estimates for one H100, not yet measured there):
#      MAE ViT-B/16                        img/s, MFU                                     ~25 s
#      MAE ViT-L/16                        img/s, MFU                                     ~35 s
#      AMT ViT-B/16                        after its store's refresh (256 images)         ~30 s
#      AutoMAE ViT-B/16                    the preset's frozen extractor (fresh weights)  ~35 s
#      MAE ViT-H/14, micro 128, ZeRO-2     peak memory against python -m mimscale.plan    ~70 s
#                                          (+ ~15 s for the planner; a note instead when the tree has none)
#      MAE ViT-B/16 on the WebDataset shards, WORKERS=12 loader workers: data wait %      ~35 s
#      the same with data.decode=nvjpeg (workers read bytes, the GPU decodes): data wait % ~35 s
#      the loader alone, CPU decode, then nvJPEG, at WORKERS: img/s, CPU cores used      2 x ~20 s
# 4. Writes $OUT/gpu_quick.json (benchmarks.gpu's JSON), $OUT/gpu_quick.md (the markdown table) and
#    $OUT/gpu_quick.log. Total about 5-6 minutes; CASE_TIMEOUT= (240 s; --tiny 600 s) bounds each row.
#
# QUICK_TINY=1 (or --tiny) runs the same steps on a CPU at toy sizes in fp32 (ViT-Tiny for ViT-B,
# ViT-Small for ViT-L and ViT-H, 32 px, micro batch 2 (ViT-H's row: 4), 24 images, 1 + 1 steps):
# what tests/integration/test_bench.py runs; its numbers mean nothing.
set -euo pipefail

DRY_RUN=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        --tiny) QUICK_TINY=1 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_quick.sh: unknown argument $arg (--dry-run, --tiny, --help)" >&2; exit 2 ;;
    esac
done

abspath() {  # a path from the caller's directory, made absolute (the script works from the repository root)
    case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac
}

REPO=$(cd "$(dirname "$0")/.." && pwd)
QUICK_TINY=${QUICK_TINY:-0}
SKIP_INSTALL=${SKIP_INSTALL:-0}
PYTHON=${PYTHON:-python3}
OUT=$(abspath "${OUT:-$REPO/runs/gpu_quick}")
WHEELS=$(abspath "${WHEELS:-$REPO/wheels}")
SCRATCH=${TMPDIR:-/tmp}
if [ "$QUICK_TINY" = 1 ]; then SUFFIX=-tiny; else SUFFIX=; fi
WORK=$(abspath "${WORK:-$SCRATCH/mimscale-gpu-quick$SUFFIX}")  # data and checkpoints: never under $OUT (it comes back whole)
VENV=$(abspath "${VENV:-$SCRATCH/mimscale-gpu-quick-venv}")
case $PYTHON in */*) PYTHON=$(abspath "$PYTHON") ;; esac
cd "$REPO"

if [ "$QUICK_TINY" = 1 ]; then
    export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    N_IMAGES=${N_IMAGES:-24}; SHARD_SIZE=8; STEPS=${STEPS:-1}; WARMUP=${WARMUP:-1}; WORKERS=${WORKERS:-1}
    B=vit_base; L=vit_small; H=vit_small; H_MICRO=4; TINY=(--tiny)  # benchmarks.gpu --tiny: vit_base -> vit_tiny
else
    N_IMAGES=${N_IMAGES:-400}; SHARD_SIZE=100; STEPS=${STEPS:-8}; WARMUP=${WARMUP:-3}; WORKERS=${WORKERS:-12}
    B=vit_base; L=vit_large; H=vit_huge; H_MICRO=128; TINY=()
fi
if [ "$QUICK_TINY" = 1 ]; then CASE_TIMEOUT=${CASE_TIMEOUT:-600}; else CASE_TIMEOUT=${CASE_TIMEOUT:-240}; fi
# what the node lacks (its torch, timm, numpy, pillow, opencv, pyyaml, safetensors stay)
NEED=(deepspeed webdataset simplejpeg tqdm)

say() { echo "[gpu_quick] $*" >&2; }
run() {  # a command, or with --dry-run its line (words quoted only where the shell needs it)
    if [ "$DRY_RUN" = 0 ]; then "$@"; return; fi
    local word line=+
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./=,:@+-]+$ ]]; then line+=" $word"; else line+=" $(printf '%q' "$word")"; fi
    done
    echo "$line"
}
have_all() {  # does python $1 find every package of NEED?
    "$1" -c 'import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))' "${NEED[@]}" 2>/dev/null
}

# ------------------------------------------------------------------------------ 1. the wheels
install() {
    [ "$DRY_RUN" = 1 ] || [ -d "$WHEELS" ] || {
        say "no wheel folder $WHEELS: build it where there is network with 'bash benchmarks/gpu_wheels.sh' and bring it along (WHEELS=)"
        exit 1
    }
    if [ "$DRY_RUN" = 0 ] && [ -x "$VENV/bin/python" ] && have_all "$VENV/bin/python"; then
        say "reusing $VENV"
        PY=$VENV/bin/python
    elif [ "$DRY_RUN" = 1 ] || "$PYTHON" -m venv --system-site-packages "$VENV" >"$SCRATCH/gpu_quick_venv.log" 2>&1; then
        PY=$VENV/bin/python
        run "$PY" -m pip install --no-index --find-links "$WHEELS" "${NEED[@]}"
    else
        say "no venv ($(tail -n 1 "$SCRATCH/gpu_quick_venv.log")): installing into the user site"
        PY=$PYTHON
        PIP_BREAK_SYSTEM_PACKAGES=1 run "$PY" -m pip install --user --no-index --find-links "$WHEELS" "${NEED[@]}"
        PATH=$("$PY" -c 'import site; print(site.getuserbase())')/bin:$PATH
    fi
    PATH=$(dirname "$PY"):$PATH  # deepspeed's ninja, should a JIT op be built
    export PATH
}

if [ "$SKIP_INSTALL" = 1 ]; then
    PY=$PYTHON
else
    install
fi
run mkdir -p "$OUT" "$WORK"
if [ "$DRY_RUN" = 0 ]; then  # what the rows import and need, and the versions they run (the log's first line)
    if ! versions=$("$PY" - "$QUICK_TINY" 2>&1 <<'PYEOF'
import sys

import cv2, numpy, PIL, safetensors, timm, torch, tqdm, yaml  # noqa: F401  (the node's)
import deepspeed, simplejpeg, webdataset  # the wheels'

cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
if cuda is None and sys.argv[1] != "1":
    sys.exit("no CUDA device visible to torch (QUICK_TINY=1 runs the plumbing on a CPU)")
print(f"python {sys.version.split()[0]}, torch {torch.__version__} ({cuda or 'CPU'}), timm {timm.__version__}, numpy {numpy.__version__},",
      f"deepspeed {deepspeed.__version__}, webdataset {webdataset.__version__}, simplejpeg {simplejpeg.__version__}")
PYEOF
    ); then
        say "$PY: $(echo "$versions" | tail -n 1)"
        exit 1
    fi
    versions=$(echo "$versions" | tail -n 1)
    say "$versions"
    echo "$versions" >"$OUT/gpu_quick.log"
fi

# ------------------------------------------------------------------------------ 2. the data
IMAGES=$WORK/imagenet
SHARDS=$WORK/shards
if [ "$DRY_RUN" = 1 ]; then
    echo "+ write $N_IMAGES synthetic JPEGs (about 500 x 375, 10 classes) into $IMAGES/train/<wnid>/ with $IMAGES/synsets.txt"
elif [ "$(cat "$IMAGES/DONE" 2>/dev/null)" != "$N_IMAGES" ]; then
    say "writing $N_IMAGES synthetic JPEGs into $IMAGES"
    rm -rf "$IMAGES" "$SHARDS"
    "$PY" - "$IMAGES" "$N_IMAGES" <<'EOF'
"""ImageNet-like JPEGs: ImageNet's common sizes around 500 x 375, smooth content (an upsampled random
grid) plus grain, quality 90 (about 100 KB each, near ImageNet's average), in class folders."""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

root, n = Path(sys.argv[1]), int(sys.argv[2])
classes = [f"n{90000000 + i:08d}" for i in range(10)]
rng = np.random.default_rng(0)
sizes = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 500), (640, 480), (500, 356)]
for wnid in classes:
    (root / "train" / wnid).mkdir(parents=True, exist_ok=True)
(root / "synsets.txt").write_text("".join(f"{w} synthetic class {i}\n" for i, w in enumerate(classes)))
for i in range(n):
    w, h = sizes[i % len(sizes)]
    coarse = rng.integers(0, 256, (h // 24 + 2, w // 24 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.integers(-10, 11, (h, w, 3)), 0, 255).astype(np.uint8)
    wnid = classes[i % len(classes)]
    Image.fromarray(pixels).save(root / "train" / wnid / f"{wnid}_{i:05d}.JPEG", quality=90)
(root / "DONE").write_text(str(n))
EOF
fi
run "$PY" -m data_prep.wds --src "$IMAGES" --split train --out "$SHARDS" --shard-size "$SHARD_SIZE" --workers 4

# ------------------------------------------------------------------------------ 3. the rows
ROWS=(
    --case "method=mae,model=$B"                                   # MAE ViT-B/16: img/s, MFU
    --case "method=mae,model=$L"                                   # MAE ViT-L/16
    --case "method=amt,model=$B"                                   # AMT ViT-B/16 (after its store's refresh)
    --case "method=automae-frozen,model=$B"                        # AutoMAE ViT-B/16, the preset's frozen extractor
    --case "method=mae,model=$H,micro=$H_MICRO,zero=2,plan=1"      # MAE ViT-H/14 at micro 128: memory vs the planner
    --case "method=mae,model=$B,data=wds"                          # MAE ViT-B/16 on WebDataset shards: data wait
    --case "method=mae,model=$B,data=wds,decode=nvjpeg"            # the same, JPEGs decoded on the GPU (data.decode=nvjpeg)
    --case "kind=loader,data=wds"                                  # the loader alone, CPU decode: img/s, CPU cores used
    --case "kind=loader,data=wds,decode=nvjpeg"                    # the loader alone, nvJPEG: img/s, CPU cores used
)
BENCH=("$PY" -m benchmarks.gpu "${TINY[@]}" "${ROWS[@]}" --methods mae --zero 1 --compile off --data synthetic
       --steps "$STEPS" --warmup "$WARMUP" --wds "$SHARDS" --workers "$WORKERS" --timeout "$CASE_TIMEOUT"
       --save-dir "$WORK/save" --json-out "$OUT/gpu_quick.json" --md-out "$OUT/gpu_quick.md")
if [ "$DRY_RUN" = 1 ]; then
    run "${BENCH[@]}"
    "$PYTHON" -m benchmarks.gpu "${BENCH[@]:3}" --list  # the cases, parsed by benchmarks.gpu (no torch import)
    exit 0
fi
say "running $(( ${#ROWS[@]} / 2 )) rows (log: $OUT/gpu_quick.log)"
status=0
"${BENCH[@]}" 2>&1 | tee -a "$OUT/gpu_quick.log" || status=$?
say "done in ${SECONDS} s (exit $status): $OUT/gpu_quick.json, $OUT/gpu_quick.md"
exit "$status"
