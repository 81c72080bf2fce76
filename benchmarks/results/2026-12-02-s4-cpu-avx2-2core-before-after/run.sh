#!/usr/bin/env bash
# Alternating runs of the bench CLI of two trees (before = 837c40c, after = working tree), same machine.
set -u
OUT=$1; shift
mkdir -p "$OUT"
PY=/work/main/.venv/bin/python
for round in 1 2 3; do
  for tree in before after; do
    dir=/work/$tree; [ $tree = after ] && dir=/work/main
    for spec in "1 224" "8 224" "1 48" "1 64"; do
      set -- $spec
      (cd $dir && PYTHONPATH=$dir $PY -m bagnet_fast bench --model bagnet33 --batch $1 --size $2 --warmup 2 --repeats 5 --no-resnet --out "$OUT/$tree-b$1-s$2-r$round" > "$OUT/$tree-b$1-s$2-r$round.log" 2>&1)
    done
  done
done
