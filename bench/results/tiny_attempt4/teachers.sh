#!/bin/bash
# Runs (or continues) both teacher variants side by side on one GPU for about $1 minutes.
start=$(date +%s)
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
budget=$1
timeout $((budget * 60 + 20)) python3 -m training.tiny --out runs/tinyA --data runs/data --max-minutes $budget >> $OUT/A.log 2>&1 &
pidA=$!
while ! grep -q "clips cached\|already holds" $OUT/A.log 2>/dev/null; do sleep 3; kill -0 $pidA 2>/dev/null || break; done
left=$(python3 -c "print(round($budget - ($(date +%s) - $start) / 60, 2))")
timeout $((budget * 60 + 20)) python3 -m training.tiny --out runs/tinyB --data runs/data --teacher-config bench/results/tiny_attempt4/teacher_plain.yaml --max-minutes $left >> $OUT/B.log 2>&1 &
pidB=$!
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $OUT/smi.txt
wait $pidA $pidB
for v in A B; do
  d=runs/tiny$v/teacher_run/checkpoints; last=$(ls -d $d/step-* 2>/dev/null | tail -1)
  [ -n "$last" ] && cp $last/trainable.safetensors $OUT/trainable$v.safetensors && echo "$v: $last"
  [ -f runs/tiny$v/teacher/pose_encoders.safetensors ] && cp runs/tiny$v/training.json $OUT/training$v.json
  # keep only the newest checkpoint on the machine
  ls -d $d/step-* 2>/dev/null | head -n -1 | xargs -r rm -rf
done
grep -h "it/s\|steps_s" $OUT/A.log | tail -c 300; echo; tail -c 300 $OUT/B.log
