#!/usr/bin/env bash
# The GPU path, measured (issue 19): one script, run from the repository root, that
#   1. tests  runs the CUDA tests            (python -m pytest -k cuda, on the test files that mention CUDA)
#   2. speed  times every guide family       (benchmarks/speed.py --device cuda --grid gpu: d 10/100/1000 x 1/16/256
#                                              particles, vi_flows ms/step against Pyro's guide of the same family)
#   3. vae    trains the VAE of examples/vae.py on binarized MNIST for none/planar/iaf/sylvester/cnf at one
#             wall-clock budget per family, test -ELBO and -log p(x) (K importance samples) beside the papers'
#   4. report writes the GPU section of docs/benchmarks.md (<!-- gpu:start --> ... <!-- gpu:end -->)
# Each step runs under `timeout` (its own limit, capped by what is left of the whole budget) and leaves a log and a
# JSON in $OUT (default benchmarks/results/gpu); together 8 files: gpu.log gpu.json tests.log tests.json speed.log
# speed.json vae.log vae.json. A step cut by its timeout keeps the rows it finished (the scripts save after each).
#
#   bash benchmarks/gpu.sh                 # on a CUDA machine: at most 9 minutes (--budget 540)
#   bash benchmarks/gpu.sh --quick         # the same steps on the CPU, tiny sizes, $OUT a temp folder, docs untouched
#   bash benchmarks/gpu.sh --report DIR    # write the docs section from the JSONs of an earlier run's $OUT (DIR)
#   bash benchmarks/gpu.sh --prepare       # here (PyPI reachable): wheels + MNIST into build/gpu/ for a machine
#                                          # without network; carry build/gpu there
#
# Python: $PYTHON if set; else the first of .venv, .venv-gpu and python3 whose torch sees CUDA (--quick: .venv or
# python3, CPU); else .venv-gpu is made (pip install torch==2.13.0, a CUDA build on Linux x86-64 from PyPI, then
# pip install -e ".[dev]"). Packages it lacks (pyro-ppl, pyro-api, zuko) come from build/gpu/wheels when present
# (the lent H200 reaches no registry; its python3 has CUDA torch, torchdiffeq, pandas, pytest but not pyro).
# Budgets, planned for one H200 (seconds; each can be set in the environment): setup ~20, T_TESTS=60, T_SPEED=140
# (SPEED_CELLS_S=115 of timed cells), T_VAE=290 (VAE_TRAIN_S=30 of training per family, VAE_EVAL_S=15 of evaluation
# per family at IW_SAMPLES=5000, the CNF's at CNF_K=500 within CNF_EVAL_S=25), 30 kept for the report: 540 in all.
set -u -o pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STEPS="tests speed vae report"

MODE=full
BUDGET=""
OUT_ARG=""
REPORT_DIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) MODE=quick ;;
        --prepare) MODE=prepare ;;
        --report) MODE=report; REPORT_DIR=${2:?--report needs the folder of an earlier run}; shift ;;
        --out) OUT_ARG=${2:?--out needs a folder}; shift ;;
        --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

PREP=build/gpu
find_mnist() {
    for f in "${VI_FLOWS_MNIST:-}" shared/data/binarized_mnist.npz ../shared/data/binarized_mnist.npz \
             "$PREP/binarized_mnist.npz"; do
        if [ -n "$f" ] && [ -f "$f" ]; then echo "$f"; return; fi
    done
}

# ------------------------------------------------------------------------------------------------ --prepare
if [ "$MODE" = prepare ]; then
    PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
    mkdir -p "$PREP/wheels"
    data=$(find_mnist)
    [ -n "$data" ] && [ "$data" != "$PREP/binarized_mnist.npz" ] && install -m 0644 "$data" "$PREP/binarized_mnist.npz"
    pyro_version=$("$PY" -c "import pyro; print(pyro.__version__)" 2>/dev/null || echo 1.9.1)
    # pure-Python wheels: the H200 image has torch, numpy, opt_einsum, tqdm, torchdiffeq, pandas, pytest already
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$PREP/wheels" \
        "pyro-ppl==$pyro_version" pyro-api==0.1.2 zuko==1.6.0 || exit 1
    ls -la "$PREP" "$PREP/wheels"
    echo "device call: run(command='bash benchmarks/gpu.sh', carry=['$PREP'], timeout_s=600)"
    echo "then, here:  bash benchmarks/gpu.sh --report <the folder the files came back to>"
    exit 0
fi

# ------------------------------------------------------------------------------------------------ python
T0=$SECONDS
if [ "$MODE" = quick ]; then
    OUT=${OUT_ARG:-$(mktemp -d /tmp/vi_flows_gpu_quick.XXXXXX)}
    DEVICE=cpu
    BUDGET=${BUDGET:-210}
elif [ "$MODE" = report ]; then
    OUT=$REPORT_DIR
    DEVICE=cpu
else
    OUT=${OUT_ARG:-${OUT:-benchmarks/results/gpu}}
    DEVICE=cuda
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d /tmp/vi_flows_gpu.XXXXXX)
BUDGET=${BUDGET:-540}
DEADLINE=$((T0 + BUDGET))
TEE_PID=""
if [ "$MODE" != report ]; then
    exec > >(tee "$OUT/gpu.log") 2>&1
    TEE_PID=$!
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

has_cuda() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; }
PY=${PYTHON:-}
if [ -z "$PY" ] && [ "$MODE" != full ]; then
    PY=$( [ -x .venv/bin/python ] && echo "$ROOT/.venv/bin/python" || command -v python3 )
elif [ -z "$PY" ]; then
    for cand in .venv/bin/python .venv-gpu/bin/python "$(command -v python3)"; do
        if [ -x "$cand" ] && has_cuda "$cand"; then PY=$cand; break; fi
    done
    if [ -z "$PY" ]; then
        echo "== setup: no Python whose torch sees CUDA; making .venv-gpu (pip install torch==2.13.0, -e .[dev])"
        t=$SECONDS
        python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q torch==2.13.0 \
            && .venv-gpu/bin/pip install -q -e ".[dev]" && { .venv-gpu/bin/pip install -q zuko || true; }
        echo "== setup: .venv-gpu took $((SECONDS - t)) s"
        PY=.venv-gpu/bin/python
        has_cuda "$PY" || { echo "gpu.sh: torch in .venv-gpu does not see a GPU either; stopping"; exit 1; }
    fi
fi
# ------------------------------------------------------------------------------------------------ report
report() {  # report docs|no-docs: gpu.json (machine, steps, command) and the markdown section, from $OUT's JSONs
    "$PY" - "$OUT" "$SCRATCH" "$1" "$MODE" "$ROOT" "${DATA:-}" <<'PY'
import argparse, datetime, json, os, sys
out, scratch, docs, mode, root, data = sys.argv[1:7]
sys.path.insert(0, os.path.join(root, "benchmarks"))
import _common as C  # noqa: E402
import speed  # noqa: E402
import vae  # noqa: E402


def load(name, empty):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else empty


path = os.path.join(out, "gpu.json")
if mode == "report":
    run = json.load(open(path))
else:
    steps = []
    for line in open(os.path.join(scratch, "steps.tsv")):
        name, status, rc, seconds, limit, cmd = line.rstrip("\n").split("\t")
        steps.append({"step": name, "status": status, "seconds": int(seconds), "timeout": int(limit), "command": cmd})
    run = {"env": json.load(open(os.path.join(scratch, "env.json"))), "steps": steps, "mode": mode,
           "command": "bash benchmarks/gpu.sh" + (" --quick" if mode == "quick" else ""), "data": data or None,
           "date": datetime.date.today().isoformat()}
tests, speed_result, vae_rows = load("tests.json", {}), load("speed.json", {}), load("vae.json", [])
env = run["env"]
if env.get("gpu"):
    device = (f"{env['gpu']} ({env['gpu_memory_gib']} GiB, compute capability {env['capability']}, driver "
              f"{env.get('driver') or '?'}), {env['cpu_count']} CPU cores")
else:
    device = f"CPU only ({env['cpu_count']} cores): the quick check of the script, not a GPU measurement"
lines = [
    "## GPU (`benchmarks/gpu.sh`, issue 19)", "",
    f"Device: {device}. Python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), pyro-ppl {env['pyro']}, "
    f"zuko {env.get('zuko') or 'not installed'}; {run['date']}. Command: `{run['command']}`, one run, every step "
    "under its own timeout:", "",
    "| step | status | seconds | timeout |", "|---|---|---:|---:|",
]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['timeout']} |" for s in run["steps"]]
counts = tests.get("counts")
lines += ["", "### CUDA tests", ""]
if counts:
    lines.append(f"`python -m pytest -k cuda` on the test files that mention CUDA: {counts['passed']} passed, "
                 f"{counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped.")
    lines += [f"- {t['outcome']}: `{t['test']}`: {t['message']}" for t in tests["tests"]
              if t["outcome"] in ("failed", "error")]
    if counts["skipped"] and not env.get("gpu"):
        lines.append(f"No CUDA device: {counts['skipped']} CUDA tests skipped.")
else:
    lines.append(f"No result ({tests.get('error', 'the step did not run')}).")
lines += ["", "### Speed (`benchmarks/speed.py`)", ""]
if speed_result.get("rows"):
    lines += [
        "ms per SVI step of each vi_flows guide against Pyro's guide of the same family and size on the same "
        "device (zuko's CNF for AutoCNF; – where zuko is not installed); pairs, floor and columns as in the speed "
        f"section{'; clocks read after `torch.cuda.synchronize()`' if env.get('gpu') else ''}. "
        "Spline/coupling/Sylvester: "
        f"{speed_result['layers']} layers, hidden {tuple(speed_result['hidden'])}, {speed_result['householder']} "
        f"Householder reflections (at most d); planar/radial {speed_result['k']} layers; CNF rtol = atol = "
        f"{speed_result['cnf_tol']}.", "",
        speed.table(speed_result),
    ]
else:
    lines.append("No rows.")
lines += ["", "### VAE (`benchmarks/vae.py`)", ""]
if vae_rows:
    if vae_rows[0].get("train_seconds"):
        lines += [
            "Every family trains for the same wall-clock budget, counted from the end of its first step (`epochs`: "
            "how far that got), and is evaluated on as many test images as its evaluation budget allowed.", "",
        ]
    lines += [
        vae.table(vae_rows, argparse.Namespace(note="")).replace("### VAE on", "#### VAE on"),
    ]
else:
    lines.append("No rows.")
text = "\n".join(lines)
if mode != "report":  # --report reads a fetched, read-only folder
    run["markdown"] = text
    json.dump(run, open(path, "w"), indent=1)
print(text)
if docs == "docs":
    target = os.environ.get("GPU_DOCS", C.DOCS)  # GPU_DOCS: another markdown file (tests)
    C.update_docs("gpu", text, target)
    print(f"\n(written to {target})")
PY
}
if [ "$MODE" = report ]; then
    report docs
    rc=$?
    rm -rf "$SCRATCH"
    exit $rc
fi

missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('pyro', 'pyroapi', 'torchdiffeq', 'zuko') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    if ls "$PREP"/wheels/*.whl >/dev/null 2>&1; then
        echo "== setup: $missing missing; installing $PREP/wheels/*.whl into $SCRATCH/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH/site" "$PREP"/wheels/*.whl
        export PYTHONPATH="$PYTHONPATH:$SCRATCH/site"
    elif [ "$missing" != zuko ]; then
        echo "== setup: $missing missing and no $PREP/wheels (bash benchmarks/gpu.sh --prepare); trying pip"
        timeout 300 "$PY" -m pip install -q -e . || { echo "gpu.sh: cannot install vi_flows' needs"; exit 1; }
    fi
fi
"$PY" - "$SCRATCH/env.json" "$DEVICE" <<'PY' || { echo "gpu.sh: $PY cannot import torch/pyro/vi_flows"; exit 1; }
import json, os, platform, subprocess, sys
import pyro, torch
import vi_flows
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "cuda": torch.version.cuda, "pyro": pyro.__version__, "vi_flows": vi_flows.__version__,
        "cpu_count": os.cpu_count(), "device": sys.argv[2], "gpu": None}
try:
    import zuko
    info["zuko"] = zuko.__version__
except ImportError:
    info["zuko"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}")
    try:
        cmd = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
elif sys.argv[2] == "cuda":
    sys.exit("torch sees no CUDA device")
json.dump(info, open(sys.argv[1], "w"), indent=1)
print("== setup:", ", ".join(f"{k} {v}" for k, v in info.items()))
PY
echo "== setup done in $((SECONDS - T0)) s; mode $MODE, device $DEVICE, out $OUT, budget $BUDGET s"

# ------------------------------------------------------------------------------------------------ steps
: >"$SCRATCH/steps.tsv"
run_step() {  # run_step NAME LIMIT_S CMD...: under timeout, capped by the budget left (30 s kept for the report)
    local name=$1 limit=$2 start=$SECONDS rc status
    shift 2
    local left=$((DEADLINE - SECONDS - 30))
    [ "$limit" -gt "$left" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "== $name: skipped, the budget is spent"
        printf '%s\tskipped (budget)\t-\t0\t%s\t%s\n' "$name" "$limit" "$*" >>"$SCRATCH/steps.tsv"
        return
    fi
    echo "== $name (timeout ${limit} s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in 0) status=ok ;; 124|137) status="timed out" ;; *) status="failed (exit $rc)" ;; esac
    echo "== $name: $status after $((SECONDS - start)) s"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" "$*" \
        >>"$SCRATCH/steps.tsv"
}

# 1. tests: the suite marks CUDA tests with `@cuda` from tests/conftest.py, a skipif, not pytest.mark.cuda, so
#    `-m cuda` selects none of them; -k cuda selects them by name (and any test marked cuda).
mapfile -t cuda_files < <(grep -l cuda tests/test_*.py)
run_step tests "${T_TESTS:-60}" "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda \
    --junitxml="$SCRATCH/tests.xml" "${cuda_files[@]}"
"$PY" - "$SCRATCH/tests.xml" "$OUT/tests.json" <<'PY'
import json, sys
import xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as e:
    json.dump({"error": f"no JUnit report: {e}"}, open(sys.argv[2], "w"))
    sys.exit()
cases = []
for c in root.iter("testcase"):
    outcome, message = "passed", ""
    for tag in ("failure", "error", "skipped"):
        el = c.find(tag)
        if el is not None:
            outcome, message = ("failed" if tag == "failure" else tag), el.get("message", "")
    cases.append({"test": f"{c.get('classname')}::{c.get('name')}", "outcome": outcome, "seconds": float(c.get("time", 0)),
                  "message": message[:300]})
counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
json.dump({"counts": counts, "tests": cases}, open(sys.argv[2], "w"), indent=1)
PY

# 2. speed
if [ "$MODE" = quick ]; then
    speed_args=(--quick --dims 2 10 --particles 1 4 --budget 45)
else
    # 63 cells (7 families x 3 d x 3 particle counts); CNF cells last, so a spent --budget drops them first
    speed_args=(--grid gpu --steps 10 --repeats 3 --cnf-steps 2 --cnf-repeats 3 --budget "${SPEED_CELLS_S:-115}")
fi
run_step speed "${T_SPEED:-140}" "$PY" benchmarks/speed.py --device "$DEVICE" --cnf-without-peer \
    --out "$SCRATCH/speed" "${speed_args[@]}"
cp "$SCRATCH/speed/speed.json" "$OUT/speed.json" 2>/dev/null || echo '{"rows": [], "error": "no output"}' >"$OUT/speed.json"

# 3. vae
DATA=$(find_mnist)
if [ "$MODE" = quick ]; then
    vae_args=(--train-size 200 --test-size 20 --epochs 1 --batch-size 50 --iw-samples 10)
    cnf_args=(--iw-samples 10)
else
    # an equal wall-clock training budget per family (counted after the first step), K = 5000 on the test set
    # within VAE_EVAL_S per family (fewer test images past it: the table says how many); the CNF's exact-trace
    # evaluation costs ~25x the others' per sample, so it gets K = CNF_K and its own evaluation budget
    vae_args=(--epochs 1000 --batch-size 100 --iw-samples "${IW_SAMPLES:-5000}" --train-seconds "${VAE_TRAIN_S:-30}"
              --eval-seconds "${VAE_EVAL_S:-15}" --eval-chunk 100000 --threads 4)
    cnf_args=(--iw-samples "${CNF_K:-500}" --eval-seconds "${CNF_EVAL_S:-25}" --eval-chunk 50000)
fi
vae_common=(--device "$DEVICE" --out "$SCRATCH/vae" --doc "$SCRATCH/vae_doc.md")
[ -n "$DATA" ] && vae_common+=(--data "$DATA")
# the CNF goes last, merged into the same table (its own K), so a spent budget cuts it and not the others
{
    printf '%q ' "$PY" benchmarks/vae.py "${vae_common[@]}" "${vae_args[@]}" --families none planar iaf sylvester
    printf '; a=$?\n'
    printf '%q ' "$PY" benchmarks/vae.py "${vae_common[@]}" "${vae_args[@]}" "${cnf_args[@]}" --families cnf --merge
    printf '; exit $((a | $?))\n'
} >"$SCRATCH/vae.sh"
[ -z "$DATA" ] && echo "== vae: no binarized_mnist.npz found (set VI_FLOWS_MNIST); using load_digits"
run_step vae "${T_VAE:-290}" bash "$SCRATCH/vae.sh"
cp "$SCRATCH"/vae/vae_*.json "$OUT/vae.json" 2>/dev/null || echo '[]' >"$OUT/vae.json"

# 4. report
start=$SECONDS
if [ "$MODE" = full ]; then report docs; else report no-docs; fi
echo "== report: $((SECONDS - start)) s; total $((SECONDS - T0)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
rm -rf "$SCRATCH"
exec >&- 2>&-
[ -n "$TEE_PID" ] && wait "$TEE_PID" 2>/dev/null
exit 0
