#!/usr/bin/env bash
# The recorded continual-instruction-tuning run (benchmarks/results/cit-smollm2-cpu/): SmolLM2-135M-Instruct on
# the four tasks of ../shared/data/cit, all five methods, three seeds, on a 2-core CPU in under two hours.
# Each seed is a whole run (RUN/seed-<s>/); the three run as three processes of one thread each (on 2 cores
# that beats one 2-thread process at a time: decode steps are small GEMMs and Python), then `--seeds`
# finds them finished and writes the results over all three. The same command continues a killed run.
# Usage: benchmarks/cit_run.sh [RUN_DIR] [DATA_DIR]
set -euo pipefail
RUN=${1:-runs/cit-smollm2-cpu}
DATA=${2:-../shared/data/cit}
PY=${PYTHON:-.venv/bin/python}
BASE=$($PY -c "from switchcit.pretrained import smollm2_135m_instruct; print(smollm2_135m_instruct())")
SETTINGS=(--base "$BASE"
  --tasks "$DATA/simplification,$DATA/explanation,$DATA/haiku,$DATA/covidfact"
  --methods switchcit,oracle,sequential,replay,multitask
  --steps 8 --batch-size 8 --lr 1e-3 --eval-examples 200 --eval-ahead 1 --eval-batch-size 32 --max-new-tokens 40)
for seed in 0 1 2; do
  OMP_NUM_THREADS=1 $PY -m switchcit.cli train "${SETTINGS[@]}" --seed "$seed" --out "$RUN/seed-$seed" \
    > "$RUN.seed-$seed.log" 2>&1 &
done
wait
$PY -m switchcit.cli train "${SETTINGS[@]}" --seeds 0,1,2 --out "$RUN"
