#!/usr/bin/env bash
# The GPU check for a lent machine in one command of at most 9.6 minutes (its steps' timeouts add up to 575 s):
#   1. the CUDA tests (tests/test_cuda.py), beside
#   2. the micro-batch fitted under simulated 24 GB and 40 GB cards, a few steps each (bench/gpu.py --memory-gb);
#   3. bench/gpu.py alone at the reference config: ms/step, tokens/s, MFU, peak memory, loader wait, recompiles;
#   4. one full 5-minute train.py run.
# Writes $OUT/device_check.json (every step's result) and $OUT/device_check.log (everything printed).
#
#   bash bench/device_check.sh             # on the GPU machine; OUT defaults to /tmp/device-check
#   bash bench/device_check.sh --dry-run   # the same steps on the CPU, tiny and fast (CI runs this)
#
# The lent machine has its own python3 with torch and no network: wheels it lacks travel in .whl/ (installed to
# /tmp/site), and a prepared dataset in .carry/cache (AUTORESEARCH_CACHE) when present. PYTHON overrides python3.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "$*" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash bench/device_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-/tmp/device-check}"
export PY="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d .carry/cache ] && export AUTORESEARCH_CACHE="${AUTORESEARCH_CACHE:-$PWD/.carry/cache}"
stamp() { echo "[$(date +%T)] $*"; }

if [ $DRY = 1 ]; then
    GPU_ARGS=(--steps 2 --warmup 1); TEST_TIMEOUT=300; GPU_TIMEOUT=300; TRAIN_TIMEOUT=300
    train() {  # a tiny copy of train.py for 3 seconds: the run's plumbing, not its numbers
        "$PY" -c 'import harness
summary, output, wall = harness.run_train(dict(DEPTH="2", ASPECT_RATIO="32", HEAD_DIM="32", TOTAL_BATCH_SIZE="2**11",
                                              DEVICE_BATCH_SIZE="8"), env={"AUTORESEARCH_TIME_BUDGET": "3"})
print(output)'
    }
else
    GPU_ARGS=(--steps 10 --warmup 3); TEST_TIMEOUT=150; GPU_TIMEOUT=80; TRAIN_TIMEOUT=345  # 575 s at most
    train() { "$PY" train.py; }
fi
stamp "device check$([ $DRY = 1 ] && echo ' (dry run)'): $("$PY" -c 'import torch; print("torch", torch.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'); OUT=$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

stamp "1+2. CUDA tests, beside the micro-batch under simulated 24 and 40 GB cards"
# -o addopts=: pyproject.toml's addopts ask for pytest-xdist, which the device's python3 lacks
timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -o addopts= -p no:cacheprovider tests/test_cuda.py \
    --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1 &
TESTS=$!
timeout "$TEST_TIMEOUT" "$PY" bench/gpu.py "${GPU_ARGS[@]}" --backends flex --memory-gb 24,40 --out "$OUT/memory.json" \
    > "$OUT/memory.log" 2>&1
echo "memory simulation: exit $?"; tail -n 6 "$OUT/memory.log"
wait $TESTS; echo "tests: exit $?"; tail -n 3 "$OUT/tests.log"

stamp "3. bench/gpu.py at the reference config"
timeout "$GPU_TIMEOUT" "$PY" bench/gpu.py "${GPU_ARGS[@]}" --backends fa3,flex --out "$OUT/gpu.json"
echo "gpu.py: exit $?"

stamp "4. one full train.py run"
timeout "$TRAIN_TIMEOUT" bash -c "$(declare -f train); train" > "$OUT/train.log" 2>&1
echo "train.py: exit $?"; sed -n '/^---$/,$p' "$OUT/train.log"

stamp "summary"
"$PY" - "$OUT" <<'EOF'
import json, re, sys, xml.etree.ElementTree as ET
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None
report = dict(gpu=load("gpu.json"), memory=load("memory.json"))
if (out / "tests.xml").exists():
    suite = ET.parse(out / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    report["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    report["tests"]["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                                 if c.find("failure") is not None or c.find("error") is not None]
train_log = (out / "train.log").read_text() if (out / "train.log").exists() else ""
block = train_log[train_log.rfind("\n---\n"):] if "\n---\n" in train_log else ""
report["train"] = dict(re.findall(r"^(\w+):\s+(\S+)$", block, re.M)) or None
report["train_startup"] = re.findall(r"^(?:device|precision|attention|compile|budget|batch): .*$", train_log, re.M)
(out / "device_check.json").write_text(json.dumps(report, indent=1) + "\n")
print(json.dumps({k: v for k, v in report.items() if k != "train_startup"}, indent=1)[:3000])
EOF
stamp "done: $OUT/device_check.json"
