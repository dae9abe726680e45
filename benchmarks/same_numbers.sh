#!/bin/bash
# The same tiny runs (synthetic set, 32 px, seeded) on two source trees, e.g. before and after a
# restructuring; prints every epoch's logged losses and validation metrics of every stage, so the two
# trees' outputs can be diffed. It proves a change kept behaviour where the numbers come out identical.
#
#   benchmarks/same_numbers.sh OLD_TREE NEW_TREE [OUT_DIR]     (each tree: a checkout of this repository)
#
# The dataset key of the pretrain job is read from each tree (`data`; older trees name it `style.data`).
set -e
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
OUT=${3:-/tmp/same_numbers}
SYN="data.synthetic_dir=$OUT/synth data.synthetic.num_train=96 data.synthetic.num_val=32 data.synthetic.image_size=32 data.synthetic.num_styles=8 data.image_size=32"
for tree in "$1" "$2"; do
  out=$OUT/$(basename "$tree"); rm -rf "$out"; mkdir -p "$out"; cd "$tree"
  D=data; grep -q "style: StyleStatsConfig = field(default_factory=StyleStatsConfig)  # the style_stats" step_ray/pipelines/pretrain.py 2>/dev/null || D=style.data
  PYTHONPATH=$tree $PY jobs/pretrain.py ${SYN//data./$D.} style.reduction.dim=16 mining.k_far=40 style.num_actors=1 \
     train.encoder.base_channels=8 'train.encoder.block_channels=[8,16]' train.max_epochs=3 train.batch_size=8 \
     train.knn_reference=96 train.val_triplets=300 run.storage_path=$out/runs run.name=s1 cache_dir=$out/cache > $out/pretrain.log 2>&1
  PYTHONPATH=$tree $PY jobs/train_generator.py $SYN encoder_checkpoint=$out/runs/s1/checkpoint_epoch0002 \
     train.generator.base_channels=8 train.discriminator.base_channels=8 train.batch_size=8 train.val_images=16 \
     stage2_epochs=2 stage3_epochs=1 train_mapper=false evaluate=false run.storage_path=$out/runs run.name=g > $out/gen.log 2>&1
  PYTHONPATH=$tree $PY jobs/train_munit.py $SYN train.max_epochs=2 train.max_steps=8 train.batch_size=4 train.val_images=8 \
     train.model.dim=8 train.model.mlp_dim=16 train.model.n_res=1 train.discriminator.base_channels=8 train.discriminator.n_layers=1 \
     train.discriminator.num_scales=2 evaluate=false run.storage_path=$out/runs run.name=m > $out/munit.log 2>&1
  PYTHONPATH=$tree $PY jobs/train_multidomain.py $SYN train.max_epochs=2 train.max_steps=6 train.model.num_domains=4 \
     train.model.style_dim=8 train.model.dim=8 train.model.max_dim=32 train.model.n_bottleneck=1 train.model.encoder_down=3 \
     'train.model.flow_hidden=[16, 16]' 'train.model.style_disc_hidden=[16]' train.val_images=16 evaluate=false \
     run.storage_path=$out/runs run.name=md > $out/md.log 2>&1
  $PY - "$out" > $out/numbers.txt <<'PY'
import glob, json, sys
out = sys.argv[1]
for run in ("s1", "stage2-g", "stage3-g", "m", "md"):
    last = sorted(glob.glob(f"{out}/runs/{run}/checkpoint_epoch*"))[-1]
    for e in json.load(open(f"{last}/state.json"))["history"]:
        print(run, e["epoch"], {k: round(v, 6) for k, v in sorted(e.items()) if k.startswith(("train_", "val_"))})
PY
  echo "== $tree"; cat $out/numbers.txt
done
if diff -q "$OUT/$(basename "$1")/numbers.txt" "$OUT/$(basename "$2")/numbers.txt" > /dev/null; then
  echo "SAME: every logged number of every epoch of every stage agrees to 6 decimals"
else
  echo "DIFFERENT:"; diff "$OUT/$(basename "$1")/numbers.txt" "$OUT/$(basename "$2")/numbers.txt" || true
fi
