mkdir -p /tmp/mc && OUT=/tmp/mc STEPS=2 timeout 200 bash tools/gpu_model_check.sh > $OUT/mc.log 2>&1; echo rc=$?; tail -3 $OUT/mc.log; grep -hE "passed|failed|max rel" /tmp/mc/model/*.txt | tail -5
