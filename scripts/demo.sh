#!/usr/bin/env bash
# make demo [SOURCE=folder|wds|ffcv|synthetic] [METHOD=mae|amt|automae]: the method's tiny preset on 2 CPU
# ranks (fp32, ZeRO-1). wds and ffcv first convert the shared ImageNet sample into runs/data/
# (once; kept for reruns). Ends with the run's pictures (python -m mimscale.report runs/demo).
set -euo pipefail
SOURCE=${1:-folder}
SAMPLE=${2:-../shared/data/imagenet-sample}
METHOD=${3:-mae}
PRESET=mimscale/configs/${METHOD}_vit_tiny_cpu.yaml
if [ ! -f "$PRESET" ]; then
  echo "METHOD=$METHOD: no $PRESET (allowed: mae, amt, automae)" >&2
  exit 2
fi
PY=.venv/bin/python
if [ "$SOURCE" != synthetic ] && [ ! -d "$SAMPLE/train" ]; then
  echo "$SAMPLE not found: using synthetic images"
  SOURCE=synthetic
fi
case "$SOURCE" in
  synthetic) data=(--set data.source=synthetic) ;;
  folder) data=(--set data.source=folder --set "data.path=$SAMPLE") ;;
  wds)
    [ -f runs/data/wds/train-manifest.json ] || $PY -m data_prep.wds --src "$SAMPLE" --split train --out runs/data/wds --shard-size 250 --workers 2
    data=(--set data.source=wds --set data.path=runs/data/wds) ;;
  ffcv)
    [ -f runs/data/train.beton ] || $PY -m data_prep.ffcv --src "$SAMPLE" --split train --out runs/data/train.beton --workers 2
    data=(--set data.source=ffcv --set data.path=runs/data/train.beton) ;;
  *) echo "SOURCE=$SOURCE: allowed values: folder, wds, ffcv, synthetic" >&2; exit 2 ;;
esac
rm -rf runs/demo
PATH=$PWD/.venv/bin:$PATH CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu deepspeed --num_gpus 2 mimscale/pretrain.py \
  --deepspeed_config ds_configs/cpu_fp32_zero1.json --config "$PRESET" \
  --set output_dir=runs/demo --set resume=never "${data[@]}" \
  --set tracking.mask_grid_every=10 --set tracking.cka_every_epochs=0.2  # for the report's grids and CKA curve
echo "pictures of the run (loss, throughput, CKA, mask grids): $($PY -m mimscale.report runs/demo)"
