#!/usr/bin/env bash
# Calibration recipes on the demo, every held-out domain, in one device call (< 9 minutes on an H100):
#   source bench/device_setup.sh && QUANTLAB_COMMIT=<commit> bash bench/device_quality.sh
# 1. bench.quality at 2.5, 3.0 and 4.0 bpw for every recipe at the default 32 x 512 rows;
# 2. the recipe with the lowest mean log geomean ratio there, again at 128 x 512 rows.
# Logs and the results JSON go to $OUT (default /tmp/quality-out); the JSON also lands in bench/results/.
#
# Time, from bench/RESULTS.md (demo conversion ~25 s on the H100: load 5, calibration 2, measure 6,
# quantize 6): per recipe one calibration and measurement plus three quantizations, ~50 s with the
# scoring of 4 domains x 8192 tokens (seconds on a GPU); 4 recipes ~200 s. At 128 rows, four times the
# calibration, measurement (64 rows) and quantization tokens: ~110 s. Plus our kernels' one-time build
# on a fresh machine. Each step has its own time limit, and bench.quality rewrites its JSON after every
# conversion, so a step cut short keeps what it measured.
set -u
OUT=${OUT:-/tmp/quality-out}
mkdir -p "$OUT/log" "$OUT/results"
WORK=$(mktemp -d /tmp/quantlab-quality.XXXX)
start=$(date +%s)
before=$(ls bench/results/ | sort)

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/log/gpu.txt" 2>&1
python3 -c "from core.kernels.build import kernels; kernels()" > "$OUT/log/kernel_build.log" 2>&1
echo "kernels ready after $(( $(date +%s) - start )) s"

timeout 330 python3 -m bench.quality --device cuda --bpw 2.5 3.0 4.0 --rtn --recipes chat wide-chat free mixed \
    --work "$WORK/recipes" > "$OUT/log/recipes.log" 2>&1
echo "recipes: status $?, $(( $(date +%s) - start )) s"
tail -12 "$OUT/log/recipes.log"

best=$(python3 - "$OUT/log/recipes.log" <<'EOF'
import json, math, re, sys
from pathlib import Path
# The results file the recipes step wrote (its path is on its "wrote" lines).
paths = re.findall(r"^wrote (.+\.json)$", Path(sys.argv[1]).read_text(), re.M)
rows = json.loads(Path(paths[-1]).read_text())["rows"] if paths else []
score = {}
for row in rows:
    if row.get("recipe"):
        score.setdefault(row["recipe"], []).append(math.log(row["geomean_ratio"]))
complete = {recipe: sum(logs) / len(logs) for recipe, logs in score.items() if len(logs) == max(map(len, score.values()))}
print(min(complete, key=complete.get) if complete else "chat")
EOF
)
echo "best recipe at 32 x 512: $best"
left=$(( 520 - ($(date +%s) - start) ))
if [ "$left" -gt 60 ]; then
    timeout "$left" python3 -m bench.quality --device cuda --bpw 2.5 3.0 4.0 --rtn --recipes "$best" --rows 128 \
        --work "$WORK/rows" > "$OUT/log/rows128.log" 2>&1
    echo "128 rows: status $?, $(( $(date +%s) - start )) s"
    tail -8 "$OUT/log/rows128.log"
else
    echo "no time left for the 128-row run ($left s)"
fi

for name in $(comm -13 <(echo "$before") <(ls bench/results/ | sort)); do cp "bench/results/$name" "$OUT/results/"; done
ls "$OUT/results"
rm -rf "$WORK"
