#!/usr/bin/env bash
# The GPU checks of issues 5 and 8 in one run of about 10 minutes on one H100/H200: numerical parity of the GPU
# kernels (bench/gpu_parity.py), phi-2
# training throughput of phiforge vs LitGPT (compiled, without and with full activation checkpointing) and the
# MoE layer vs the dense MLP at phi-2 size. Results: bench/results/*.json (named by card) and copies in $OUT.
#
# On a bare GPU machine with PyTorch (no pip access), carry the pure-Python wheels it lacks in .whl/ (ignored),
# fetched beforehand on a machine with pip:
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#         litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser typeshed-client
# (if `import litgpt` then fails on the image's newer huggingface-hub, add huggingface-hub<1.4 to the list), then,
# there, from the repository root:
#     bash bench/gpu_check.sh
# Every step has its own time limit and a failing step does not stop the others; the exit status is the number
# of failed steps.
set -u
OUT=${OUT:-bench/results/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # phiforge from this tree; no install needed
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
failed=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, count failures
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi -L || true
step env 60 "$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name()); import litgpt; print('litgpt', litgpt.__file__)"
# the paths the CPU suite cannot reach, against reference paths: grouped-GEMM MoE in bf16, the chunked loss under
# bf16 autocast, the flash/cuDNN SDPA kernels
step parity 120 "$PY" bench/gpu_parity.py
# the settings: phi-2, T=2048, bf16, fused AdamW; LitGPT's reference runs were micro-batch 4 (no AC)
# and 8 (full AC); one round each to fit the session, so these are single measurements
step throughput 240 "$PY" bench/throughput.py --preset phi-2 --seq-len 2048 --micro-batch 4 --compile \
    --impls phiforge,litgpt --rounds 1
step throughput-ac 180 "$PY" bench/throughput.py --preset phi-2 --seq-len 2048 --micro-batch 8 --ac full --compile \
    --impls phiforge,litgpt --rounds 1
step moe 90 "$PY" bench/moe.py --full
cp bench/results/throughput-cuda-*.json bench/results/moe-cuda*.json bench/results/gpu-parity-cuda*.json "$OUT"/ 2>/dev/null
echo "failed steps: $failed"
exit "$failed"
