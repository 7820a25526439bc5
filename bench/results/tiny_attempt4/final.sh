#!/bin/bash
# $1: --max-minutes, $2: hard limit in seconds, $3: student steps
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
timeout $2 python3 -m training.tiny --out runs/tinyA2 --teacher-config bench/results/tiny_attempt4/teacher_cont.yaml --student-steps $3 --skip-evaluation --max-minutes $1 > $OUT/run.log 2>&1
echo rc $?
for d in teacher_run student_run; do
  c=runs/tinyA2/$d/checkpoints; last=$(ls -d $c/step-* 2>/dev/null | tail -1)
  [ -n "$last" ] && echo "$d: $last" && ls -d $c/step-* | head -n -1 | xargs -r rm -rf && cp $last/trainable.safetensors $OUT/$d.safetensors
done
cp runs/tinyA2/training.json $OUT/ 2>/dev/null
[ -f runs/tinyA2/teacher/pose_encoders.safetensors ] && tar cf $OUT/teacher.tar -C runs/tinyA2/teacher transformer pose_encoders.safetensors
[ -f runs/tinyA2/model/pose_encoders.safetensors ] && tar cf $OUT/model.tar -C runs/tinyA2 model
ls -la $OUT; grep -o "steps_s=[0-9.]*" $OUT/run.log | tail -1; grep INFO $OUT/run.log | tail -6
