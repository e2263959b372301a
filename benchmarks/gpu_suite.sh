#!/usr/bin/env bash
# Issue 26's GPU measurements in one run (< 8 minutes on one H100/H200), every number written under $OUT.
#
#   bash benchmarks/gpu_wheels.sh                      # here first (needs PyPI): lm-eval & co. as wheels in .whl/
#   device run: command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=560
#   SUITE_STAGES=loss1b,harness8b bash benchmarks/gpu_suite.sh   # a second run: only the stages named
#   bash benchmarks/gpu_suite.sh --dry                 # CPU dry run of every stage on tiny models (OUT=/tmp/...)
#
# Stages, in priority order; one that would end past the deadline (SUITE_DEADLINE, 440 s after the start) is
# skipped and says so, and each runs under `timeout`, so the script ends on its own before the device's limit:
#   tests            the parity tests on the GPU: CKPTEVAL_TEST_DEVICE=cuda pytest tests/test_fast_lm.py
#                    tests/test_auto_batch.py (FastLM vs HFLM, auto batch size, eval.compile=true)
#   loss8b           Llama-3-shaped 8B, bf16, seq 2048: the plain transformers loop at batch 1..32 (its best
#                    batch), ours at that batch, ours at eval.batch_size=auto: tokens/s, peak memory, share of
#                    the measured bf16 matmul peak (goal: >= 50% and >= 1.5x the plain loop at its best batch)
#   harness1b        1B, bf16: cases (a) (b) (c) of bench_harness_speed.py, FastLM and HFLM both at batch auto
#                    (goals: (a) >= 4x, (b) >= 10x, (c) >= 2x HFLM)
#   job1b            1B, bf16: whole `run.py mode=harness` vs `lm_eval --model hf ... --batch_size auto`, local tasks
#   loss1b           1B, bf16, seq 2048: as loss8b, + eval.compile=true
#   harness8b        8B, bf16: as harness1b
#   loss8b_compile   8B, bf16: as loss8b, + eval.compile=true (compilation takes a minute or two)
# Files back (the device returns at most 8): summary.txt (environment, each stage's table), results.json (every
# JSON record), tests.log, logs.tgz (every stage's whole log).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
DRY=0
[ "${1:-}" = "--dry" ] && DRY=1
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-/tmp/gpu_suite_dry}
  DEVICE=cpu BIG=tiny MID=tiny SEQ=128 DEADLINE=${SUITE_DEADLINE:-5000} SLOW=5  # a loaded 2-core CPU: 5x the time
  PLAIN=1,2 BATCHES=2 DOCS=2 NGROUPS=1 GEN_DOCS=4 JOB_DOCS=8 TEST_FILTER=(-k "auto_fits or goes_on or matches_hflm_per_request")
else
  DEVICE=cuda BIG=8b MID=1b SEQ=2048 DEADLINE=${SUITE_DEADLINE:-440} SLOW=1
  PLAIN=1,2,4,8,16,32 BATCHES=3 DOCS=32 NGROUPS=4 GEN_DOCS=64 JOB_DOCS=400 TEST_FILTER=()
fi
: "${OUT:?OUT is where the results go}"
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu_suite.XXXX)
SUMMARY=$OUT/summary.txt
STAGES=${SUITE_STAGES:-tests,loss8b,harness1b,job1b,loss1b,harness8b,loss8b_compile}
GRACE=15
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

say() { echo "$*" | tee -a "$SUMMARY"; }

# ---- set-up: the carried wheels, the environment as measured
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$DRY" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$WORK/install.log" 2>&1 || { say "wheel install failed:"; tail -20 "$WORK/install.log" | tee -a "$SUMMARY"; }
  export PYTHONPATH=/tmp/site:$ROOT/src:$ROOT
else
  export PYTHONPATH=$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
say "== gpu_suite $(date -u +%Y-%m-%dT%H:%M:%SZ) dry=$DRY device=$DEVICE stages=$STAGES commit=$(git rev-parse --short HEAD 2>/dev/null)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
  "$PY" - <<'EOF'
import importlib.metadata as m, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("transformers", "lm_eval", "accelerate", "datasets", "tokenizers", "hydra-core", "pyarrow", "triton"):
    try:
        print(f"  {name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"  {name} MISSING")
EOF
} 2>&1 | tee -a "$SUMMARY"

stage() {  # stage NAME SECONDS CMD...: run CMD unless it would end past the deadline; log, summary, bundle
  local name=$1 est=$(( $2 * SLOW )) now limit t0 rc
  shift 2
  case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
  now=$(( $(date +%s) - START ))
  if (( now + est > DEADLINE )); then
    say "== $name: skipped (at ${now} s it needs ~${est} s; deadline ${DEADLINE} s): SUITE_STAGES=$name to run it"
    return 0
  fi
  limit=$(( DEADLINE + GRACE - now ))
  (( limit > 2 * est )) && limit=$(( 2 * est ))
  say "== $name (at ${now} s, limit ${limit} s): $*"
  t0=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  say "-- $name: exit $rc after $(( $(date +%s) - t0 )) s$( ((rc == 124)) && echo ' (timed out)')"
  grep -v -E "it/s\]|s/it\]|FutureWarning|warnings.warn|^\s*$|return forward_call" "$WORK/$name.log" | tail -n 40 \
    >> "$SUMMARY"
  tar -czf "$OUT/logs.tgz" -C "$WORK" . 2>/dev/null
  return 0
}

B=benchmarks
export CKPTEVAL_TEST_DEVICE=$DEVICE
stage tests 150 "$PY" -m pytest -q -p no:cacheprovider -m "not dist and not scale" -o addopts="" \
  tests/test_fast_lm.py tests/test_auto_batch.py "${TEST_FILTER[@]}" --durations=8
cp "$WORK/tests.log" "$OUT/tests.log" 2>/dev/null
stage loss8b 80 "$PY" $B/bench_loss.py --size "$BIG" --dtypes bfloat16 --seq "$SEQ" --plain-batches "$PLAIN" \
  --batches "$BATCHES" --auto --device "$DEVICE" --json "$WORK/loss8b.json"
HARNESS=(--dtype bfloat16 --device "$DEVICE" --batch auto --cases a,b,c --docs "$DOCS" --groups "$NGROUPS"
         --gen-docs "$GEN_DOCS" --repeats 1)
stage harness1b 90 "$PY" $B/bench_harness_speed.py --size "$MID" "${HARNESS[@]}" --json "$WORK/harness1b.jsonl"
stage job1b 90 "$PY" $B/bench_harness_job.py --size "$MID" --dtype bfloat16 --docs "$JOB_DOCS" --device "$DEVICE" \
  --json "$WORK/job1b.json" --logs "$WORK/job1b_logs"
stage loss1b 90 "$PY" $B/bench_loss.py --size "$MID" --dtypes bfloat16 --seq "$SEQ" --plain-batches "$PLAIN" \
  --batches "$BATCHES" --auto --compile --device "$DEVICE" --json "$WORK/loss1b.json"
stage harness8b 120 "$PY" $B/bench_harness_speed.py --size "$BIG" "${HARNESS[@]}" --json "$WORK/harness8b.jsonl"
stage loss8b_compile 180 "$PY" $B/bench_loss.py --size "$BIG" --dtypes bfloat16 --seq "$SEQ" --plain-batches 16 \
  --batches "$BATCHES" --compile --device "$DEVICE" --json "$WORK/loss8b_compile.json"

# ---- every JSON record in one file
"$PY" - "$WORK" "$OUT/results.json" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), {}
for f in sorted(work.glob("*.json*")):
    text = f.read_text()
    out[f.stem] = [json.loads(line) for line in text.splitlines() if line.strip()] if f.suffix == ".jsonl" \
        else json.loads(text)
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
EOF
tar -czf "$OUT/logs.tgz" -C "$WORK" . 2>/dev/null
say "== done in $(( $(date +%s) - START )) s; files: $(ls "$OUT" | tr '\n' ' ')"
