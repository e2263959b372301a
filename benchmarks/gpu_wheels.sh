#!/usr/bin/env bash
# The wheels benchmarks/gpu_suite.sh installs on the GPU machine, which reaches no package index.
#
#   bash benchmarks/gpu_wheels.sh            # HERE, with the project's venv active: fills .whl/ (git-ignored)
#   then, through the device tool:  run(command="bash benchmarks/gpu_suite.sh", carry=[".whl"], timeout_s=590)
#
# The GPU image (python 3.12) has torch, accelerate, numpy, pandas, pyarrow, scikit-learn, sacrebleu, tokenizers,
# safetensors, huggingface-hub, jinja2, pytest, ... (/work/.library/device/KINDS.md). What it lacks: lm-eval and
# its pure-Python dependencies, Hydra/OmegaConf, and a transformers as new as ours (the image's 5.17 predates APIs
# FastLM uses). MLflow is not carried: the suite runs with tracking.enabled=false, which never imports it.
# Versions are the ones installed in the environment running this script (the one the tests passed in), so the
# GPU runs the same code; pins below are the fallback. Packages published only as sources are built here into
# py3-none-any wheels (all pure Python). Everything together stays under the device's 64 MiB carry limit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${WHEELS_DIR:-.whl}
PY=${PYTHON:-python}
mkdir -p "$OUT"
rm -f "$OUT"/*.whl

# name==fallback-version: the version installed here wins
BINARY=(lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0
        pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
        tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 pytz==2026.6 nltk==3.10.4 defusedxml==0.7.1
        more-itertools==11.2.1 hydra-core==1.3.8 omegaconf==2.3.1)
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3 rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1)

pinned() {  # name==version with the installed version when there is one
  local spec name have
  for spec in "$@"; do
    name=${spec%%==*}
    have=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
    echo "$name==${have:-${spec##*==}}"
  done
}

mapfile -t binary < <(pinned "${BINARY[@]}")
mapfile -t source < <(pinned "${SOURCE_ONLY[@]}")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$OUT" "${binary[@]}"
"$PY" -m pip wheel -q --no-deps -w "$OUT" "${source[@]}"
ls -1 "$OUT"
du -ch "$OUT"/*.whl | tail -1
total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
if [ "$total" -gt $((56 * 1024 * 1024)) ]; then
  echo "wheels take $((total / 1048576)) MiB: with the working tree that passes the device's 64 MiB carry limit" >&2
  exit 1
fi
