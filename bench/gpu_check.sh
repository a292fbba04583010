#!/usr/bin/env bash
# The one GPU check (issues 22, 23 and 26): on one H100 or H200, in at most 8 minutes, one line per check,
#     PASS name: detail (seconds)      or      FAIL name: detail (seconds)
# then `gpu_check: PASS` or `gpu_check: FAIL (n failed)`; the exit status is the number of failed checks.
# Checks, in this order (docs/performance.md, "The GPU check", says what PASS means for each):
#     env          torch sees the GPU; litgpt imports (torchao too, for float8)
#     parity       bench/gpu_parity.py: grouped-GEMM MoE, chunked loss and SDPA against reference paths, bf16
#     sdpa         bench/sdpa_kernel.py: the SDPA kernel phi-2's shapes actually run in bf16 is flash or cuDNN
#     numerics     bench/gpu_numerics.py: 1 process (`none`) and FSDP2 under torchrun, same seed, bf16-mixed:
#                  the same op dtypes (as the precision table says) and losses within 5e-4
#     compile      bench/gpu_compile.py: inductor, per block, fullgraph: no recompile and no graph break over
#                  validation, train, validation, train (dense and dropless MoE)
#     memory       bench/gpu_memory.py: peak memory of configs/phi2-1xh100.yaml within 15% of `phiforge plan`
#     save-blocking bench/save_blocking.py (issue 23 item 2): the seconds a save blocks training, async vs sync
#     throughput   bench/throughput.py: phi-2, T=2048, micro-batch 4, compiled: tokens/s and MFU of phiforge
#                  bf16, phiforge float8 (the engine's `float8` key, torchao) and LitGPT, in one run
# Every check has its own time limit, cut to what is left of the 8 minutes (--budget); a failing or timed-out
# check does not stop the others. Results: bench/results/<check>-<card>.json (e.g.
# throughput-nvidia-h100-80gb-hbm3.json) and the summary bench/results/gpu-check-<card>.json. Where $OUT is set
# (the device tool's folder that comes back, 8 files at most), $OUT gets that summary and
# gpu-check-<card>.tar.gz with every check's log and result; elsewhere the logs go to
# bench/results/gpu-check-logs-<card>/.
#
# Options:
#     --dry-run          CPU, seconds per check: every check's argument handling and setup path on the tiny preset
#                        (CI runs it: tests/test_gpu_check.py); writes nothing under bench/results/. A check whose
#                        piece is not in this tree (float8, save_blocking.py) shows `MISSING name: ...` and is not
#                        counted as failed in a dry run (in a real run it is a FAIL)
#     --only a,b         run only these checks (e.g. to rerun the failed ones)
#     --args name=ARGS   append ARGS to check `name`'s command (repeatable), e.g. --args throughput="--micro-batch 2"
#     --extras           afterwards, outside the budget: throughput with full activation checkpointing
#                        (micro-batch 8) and the MoE layer against the dense MLP at phi-2 size (bench/moe.py --full)
#     --budget SECONDS   the whole run's limit (default 480; dry run 1800)
#
# Running it on a lent GPU (the device tool; the machine is bare: PyTorch, no registry). Beforehand, here, in the
# repository root, fetch the wheels it lacks into .whl/ (ignored by git: `echo /.whl/ >> .git/info/exclude`):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl \
#         litgpt==0.5.13 jsonargparse==4.41.0 docstring-parser typeshed-client 'huggingface-hub<1.4' torchao
# (litgpt 0.5.13 and what `import litgpt` needs beyond the image's lightning, torchmetrics, tokenizers and
# safetensors; huggingface-hub below 1.4 as litgpt pins it (the image has 1.33); torchao for float8: 0.18.0 was
# the newest on 2026-12-07, an abi3 wheel; use the version range of pyproject's float8 extra where it has one).
# Then one run with the tool, `.whl` in carry, a limit that leaves room to rerun the failed checks:
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560)
# and, if some failed, e.g. run(command="bash bench/gpu_check.sh --only memory,throughput", carry=[".whl"]).
# The script installs .whl/*.whl into /tmp/site itself and runs phiforge from src/ (no install needed).
set -u
DRY=0; ONLY=""; EXTRAS=0; BUDGET=""
declare -A ARGS=()
usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --extras) EXTRAS=1 ;;
        --only) ONLY=${2:?--only needs a comma list of checks}; shift ;;
        --args) [[ ${2:-} == *=* ]] || { echo "gpu_check: --args takes name=ARGS, got '${2:-}'" >&2; exit 2; }
                ARGS[${2%%=*}]="${2#*=}"; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
CHECKS="env parity sdpa numerics compile memory save-blocking throughput"
for name in ${ONLY//,/ } "${!ARGS[@]}"; do
    [[ " $CHECKS throughput-ac moe " == *" $name "* ]] || { echo "gpu_check: no check '$name' ($CHECKS)" >&2; exit 2; }
done
[[ ${BUDGET:-0} =~ ^[0-9]+$ ]] || { echo "gpu_check: --budget takes whole seconds, got '$BUDGET'" >&2; exit 2; }
BUDGET=${BUDGET:-$([ "$DRY" = 1 ] && echo 1800 || echo 480)}

cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # phiforge from this tree; no install needed
PY=${PYTHON:-python3}
if [ "$DRY" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ "$DRY" = 1 ]; then
    LOGS=${OUT:-$(mktemp -d)}; RESULTS=$LOGS; SLUG=cpu-dry-run; DRYFLAG=--dry-run
else
    LOGS=$(mktemp -d); RESULTS=bench/results; DRYFLAG=
    CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name())" 2>/dev/null || echo no-cuda)
    SLUG=$(echo "$CARD" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
fi
mkdir -p "$LOGS" "$RESULTS"
SUMMARY="$LOGS/gpu-check-steps.tsv"
: > "$SUMMARY"
failed=0; missing=0; START=$SECONDS

step() {  # step NAME LIMIT COMMAND...: one check, under min(LIMIT, what is left of the budget)
    local name=$1 limit=$2 status detail rc
    shift 2
    [ -z "$ONLY" ] || [[ ",$ONLY," == *",$name,"* ]] || return 0
    [ "$DRY" = 1 ] && limit=300  # a loaded 2-core CI machine: start-up and imports dominate
    local left=$((BUDGET - (SECONDS - START) - 5))
    if [ "$name" != throughput-ac ] && [ "$name" != moe ] && [ "$left" -lt "$limit" ]; then limit=$left; fi
    local t0=$SECONDS log="$LOGS/$name.log"
    if [ "$limit" -lt 10 ]; then
        rc=125; echo "not started: the ${BUDGET}s budget is spent" > "$log"
    else
        # shellcheck disable=SC2086  # --args' ARGS are meant to split into words
        timeout -k 10 "$limit" "$@" ${ARGS[$name]:-} > "$log" 2>&1
        rc=$?
    fi
    # the script's own verdict line (throughput-ac's says "throughput"), else its last line
    detail=$(grep -E "^(PASS|FAIL) [a-z0-9-]+: " "$log" | tail -n 1 | sed -E "s/^(PASS|FAIL) [a-z0-9-]+: //")
    local own=1
    [ -n "$detail" ] || { own=0; detail=$(grep -v '^\s*$' "$log" | tail -n 1); }
    case $rc in
        0) status=PASS ;;
        124|137) status=FAIL; detail="timed out after ${limit}s; last: $detail" ;;
        125) status=FAIL ;;
        3) if [ "$DRY" = 1 ]; then status=MISSING; else status=FAIL; fi ;;
        *) status=FAIL; [ "$own" = 1 ] || detail="exit $rc: $detail" ;;
    esac
    [ "$status" = FAIL ] && failed=$((failed + 1))
    [ "$status" = MISSING ] && missing=$((missing + 1))
    echo "$status $name: $detail ($((SECONDS - t0))s)"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$limit" "$log" "$detail" >> "$SUMMARY"
}

env_check() {  # torch and the card; litgpt (and torchao) importable
    "$PY" - "$DRY" <<'EOF'
import importlib.util, sys
import torch
dry = sys.argv[1] == "1"
cuda = torch.cuda.is_available()
card = torch.cuda.get_device_name() if cuda else "no CUDA device"
try:
    import litgpt  # noqa: F401
    lit = "litgpt imports"
except Exception as e:  # a missing wheel, or one that does not import on this image
    lit = f"litgpt does not import ({type(e).__name__}: {e})"
ao = "torchao present" if importlib.util.find_spec("torchao") else "torchao missing (float8 will FAIL)"
ok = (cuda or dry) and lit == "litgpt imports"
print(f"{'PASS' if ok else 'FAIL'} env: torch {torch.__version__} on {card}; {lit}; {ao}")
sys.exit(0 if ok else 1)
EOF
}

export -f env_check
export PY DRY RESULTS SLUG

[ "$DRY" = 1 ] || nvidia-smi -L 2>/dev/null
R=$RESULTS; S=$SLUG
step env 45 bash -c env_check
step parity 90 "$PY" bench/gpu_parity.py $DRYFLAG --out "$R/gpu-parity-$S.json"
step sdpa 60 "$PY" bench/sdpa_kernel.py $DRYFLAG --out "$R/sdpa-kernel-$S.json"
step numerics 120 "$PY" bench/gpu_numerics.py $DRYFLAG --out "$R/gpu-numerics-$S.json"
step compile 150 "$PY" bench/gpu_compile.py $DRYFLAG --variants dense,moe-padded --out "$R/gpu-compile-$S.json"
step memory 90 "$PY" bench/gpu_memory.py $DRYFLAG --config configs/phi2-1xh100.yaml --out "$R/gpu-memory-$S.json"
# issue 23 item 2's benchmark: the seconds a save blocks training, async against sync, one GPU
if [ "$DRY" = 1 ]; then save_args=(--dry-run); else save_args=(--nprocs 1 --device cuda --results "$RESULTS/save-blocking-$SLUG.json"); fi
step save-blocking 90 "$PY" bench/save_blocking.py "${save_args[@]}"
# LitGPT's reference runs were micro-batch 4 (no AC) and 8 (full AC); one round, 2 warm-up + 5 timed steps each
step throughput 300 "$PY" bench/throughput.py $DRYFLAG --preset phi-2 --seq-len 2048 --micro-batch 4 --compile \
    --impls phiforge,phiforge-float8,litgpt --float8 tensorwise --rounds 1 --warmup 2 --steps 5 --strict \
    --out "$R/throughput-$S.json"
if [ "$EXTRAS" = 1 ]; then
    step throughput-ac 240 "$PY" bench/throughput.py $DRYFLAG --preset phi-2 --seq-len 2048 --micro-batch 8 --ac full \
        --compile --impls phiforge,litgpt --rounds 1 --warmup 2 --steps 5 --out "$R/throughput-ac-full-$S.json"
    moe_size=(--full); [ "$DRY" = 1 ] && moe_size=(--d 80 --batch 1 --seq 128 --warmup 0 --iters 1)
    step moe 120 "$PY" bench/moe.py "${moe_size[@]}" --out "$R/moe-$S.json"
fi

"$PY" - "$SUMMARY" "$RESULTS/gpu-check-$SLUG.json" "$DRY" "$BUDGET" "$((SECONDS - START))" <<'EOF'
import json, sys, time
import torch
tsv, out, dry, budget, seconds = sys.argv[1:]
steps = [dict(zip(("name", "status", "seconds", "limit_s", "log", "detail"), line.rstrip("\n").split("\t", 5)))
         for line in open(tsv) if line.strip()]
for s in steps:
    s["seconds"], s["limit_s"] = int(s["seconds"]), int(s["limit_s"])
card = torch.cuda.get_device_name() if torch.cuda.is_available() and dry == "0" else "cpu (dry run)"
json.dump({"card": card, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": dry == "1",
           "budget_s": int(budget), "seconds": int(seconds), "steps": steps,
           "failed": [s["name"] for s in steps if s["status"] == "FAIL"],
           "missing": [s["name"] for s in steps if s["status"] == "MISSING"]}, open(out, "w"), indent=2)
open(out, "a").write("\n")
EOF
if [ "$DRY" = 0 ] && [ -n "${OUT:-}" ]; then  # two files back from the device: the summary and everything
    cp "$RESULTS/gpu-check-$SLUG.json" "$OUT"/
    (cd "$RESULTS" && cp ./*-"$SLUG".json "$LOGS"/) 2>/dev/null
    tar czf "$OUT/gpu-check-$SLUG.tar.gz" -C "$LOGS" .
elif [ "$DRY" = 0 ]; then
    mkdir -p "bench/results/gpu-check-logs-$SLUG" && cp "$LOGS"/* "bench/results/gpu-check-logs-$SLUG"/
fi
if [ "$failed" -gt 0 ]; then
    echo "gpu_check: FAIL ($failed failed)"
elif [ "$missing" -gt 0 ]; then
    names=$(awk -F'\t' '$2 == "MISSING" {printf "%s%s", s, $1; s=", "}' "$SUMMARY")
    echo "gpu_check: PASS (dry run; $missing missing: $names)"
else
    echo "gpu_check: PASS"
fi
exit "$failed"
