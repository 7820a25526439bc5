#!/usr/bin/env bash
# Restart time of the compiled streaming path with a saved compile cache (one GPU machine).
#
#   bash bench/cold_start.sh OUT_DIR [CACHE_DIR]
#
# 1. A cold start: bench_streaming.py --compile with an empty --compile-cache folder compiles
#    everything and fills it (inductor, Triton, artifacts.bin).
# 2. The folder is moved away and every other compiler cache on the machine is deleted, then copied
#    back to the same path, as a fresh machine that was given only that folder would have it.
# 3. A second process starts on it. ready_after_process_start_s in OUT_DIR/{cold,cached}.json is the
#    time from launch to the end of the app's warm-up (serving at full speed); "compilation" there
#    says which graphs hit the cache and where the compiler's time went.
set -euo pipefail
out=${1:?output folder}
cache=${2:-/tmp/self-forcing-compile-cache}
mkdir -p "$out"
run="python bench/bench_streaming.py --fast-kernels --compile --runs 3 --compile-cache $cache"
forget_compiler_caches() { rm -rf /tmp/torchinductor_* ~/.triton ~/.nv ~/.cache/torch; }

rm -rf "$cache" && forget_compiler_caches
$run --out "$out/cold.json" > "$out/cold.log" 2>&1
du -sh "$cache"/* > "$out/cache_sizes.txt"
mv "$cache" "$cache.saved" && forget_compiler_caches && mv "$cache.saved" "$cache"
$run --out "$out/cached.json" > "$out/cached.log" 2>&1
grep -h "ready" "$out/cold.log" "$out/cached.log"
