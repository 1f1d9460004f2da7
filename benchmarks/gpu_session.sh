#!/usr/bin/env bash
# Everything a session with a lent GPU should run, from the repository root:
#
#     KRON_KERNELS_COMMIT=<git rev-parse HEAD, run here> bash benchmarks/gpu_session.sh "$OUT" [check | check-tests | STEP...]
#
# (the device machine gets the working tree without .git: the commit must travel in the
# environment for the results' provenance; commit before the call so it names the code run).
#
# Profiles -- a lent GPU's 15 minutes hold two calls back to back on the warm machine (the
# build survives between them); issue the second as soon as the first returns (the machine
# goes back after 30 s idle):
# * `check` (call 1, <= 8 minutes): build the extension for the local GPU only (~110 s at 93d8659); the
#   model-level report at --reps 10 with one profiled step per row (~100 s); the kron_ops and
#   bottleneck suites (every case; fused = auto beside the Triton kernels and, for FacT, the
#   dense composition: what the `_CUDA_AUTO` choices are made from); the transform target rows
#   (fwht at n = 2^10 / 2^13, fastfood d = 2^14 into D = 86e6).
# * `check-tests` (call 2, <= 5 minutes; with call 1 and the machine's start inside the 15):
#   the extension's Lb refusal that segfaulted on the H200 of 93d8659, under gdb where present;
#   `pytest -m gpu -n 14 -v`, the Inductor end-to-end cases last (that run needed more than
#   300 s at -n 14, most of it in test_compile.py::test_inductor_cuda; -v keeps every verdict
#   in the log if the box closes, failures.log every failure's report); compute-sanitizer
#   memcheck on a CUDA-kernel subset.
# * the full profile (no step named; for users with time): build, tests, resources (ptxas report),
#   report (kron ops, bottleneck), transforms (fwht, fastfood), models (ViT-B/16, batch 64, bf16,
#   with a torch.cuda.memory snapshot of a KAdaptation step). Name fewer steps to fit a call's
#   10-minute limit, e.g. `build tests`, `build report`, `build transforms`, `build models`
#   (`build` is quick when `_C` is current).
#
# The device tool returns at most 8 files from $OUT, so everything (logs, env.txt, and
# results/<device>/ -- what to commit under benchmarks/results/) is kept under a work folder
# and packed into "$OUT/session.tgz" after every step: a step that hits its time box, or a
# command killed at the call's limit, still leaves the archive of the steps before it.
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR [check | check-tests | build tests resources report transforms models targets]}
shift
steps=${*:-build tests resources report transforms models}
check=0
if [[ "$steps" == check ]]; then
    check=1
    steps="build models ops targets"
elif [[ "$steps" == check-tests ]]; then
    check=1
    steps="build refusal quicktests inductor sanitize"
fi
mkdir -p "$out"
work=$(mktemp -d /tmp/kk_session.XXXXXX)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

pack() { tar czf "$out/session.tgz.tmp" -C "$work" . && mv "$out/session.tgz.tmp" "$out/session.tgz"; }

step() {  # step NAME SECONDS CMD...: run, log to NAME.log, keep going on failure, pack
    local name=$1 limit=$2; shift 2
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    local rc=$?
    echo "== $name rc=$rc"; tail -n 25 "$work/$name.log"
    pack
}

{ nvidia-smi; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"; echo "commit ${KRON_KERNELS_COMMIT:-unknown}"; } > "$work/env.txt" 2>&1
cat "$work/env.txt"
pack
if [[ " $steps " == *" build "* ]] && ls csrc/*.cu csrc/*.cpp > /dev/null 2>&1; then
    arch=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    # 180 s in check: the fastfood kernels are instantiated per generator since v2 (its .cu took 1.35x
    # as long to compile for sm_90 on the 2-core development machine, 50 s against 37 s)
    step build $(( check ? 180 : 300 )) env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 $py setup.py build_ext --inplace
fi
if (( check )); then
    # the extension's direct Lb refusal segfaulted a pytest worker on the H200 of 93d8659: its C
    # backtrace (gdb where the machine has it; else Python's faulthandler alone)
    refusal='import importlib, torch; from kron_kernels import backend
ff = importlib.import_module("kron_kernels.ops.fastfood")
theta = torch.zeros(2 ** (ff._cuda_max_log_lb(0) + 1), device="cuda")
try:
    backend.extension().fastfood_forward(theta, torch.empty(10**6, device="cuda"), 0, theta.numel())
except ValueError as e:
    print("refused:", e)'
    if command -v gdb > /dev/null; then
        step refusal 30 gdb -batch -ex run -ex bt --args $py -X faulthandler -c "$refusal"
    else
        step refusal 30 $py -X faulthandler -c "$refusal"
    fi
    # -v: xdist prints each test's verdict as it lands, so a time box still leaves them in the log
    step quicktests 150 env KRON_KERNELS_FAILURE_LOG="$work/failures.log" $py -m pytest -m gpu -k "not test_inductor_cuda" -v --tb=short --durations=15 \
        -p no:cacheprovider -n 14 tests
    step inductor 80 env KRON_KERNELS_FAILURE_LOG="$work/failures.log" $py -m pytest -m gpu -k test_inductor_cuda -v --tb=short -p no:cacheprovider -n 14 tests
    # issue 14 part 5: the CUDA C++ kernels under compute-sanitizer memcheck (a subset that fits)
    step sanitize 40 compute-sanitizer --tool memcheck --error-exitcode 1 $py -m pytest -m gpu -q -x \
        -p no:cacheprovider tests/ops/test_fwht.py tests/ops/test_fastfood.py -k "gpu_matches_scipy and n1024 or gpu_extension_matches_cpu_extension"
    step models 130 $py -m benchmarks.report --suite models --reps 10 --profile-steps 1 --out "$work/results"
    step ops 120 $py -m benchmarks.report --suite kron_ops bottleneck --rep-ms 60 --out "$work/results"
    step targets 35 $py -m benchmarks.report --suite fwht fastfood --reps 10 --cases \
        fwht-n1024-bfloat16 fwht-n8192-bfloat16 fastfood-d16384-D86000000 --out "$work/results"
    exit 0
fi
step tests 420 $py -m pytest -m gpu -q -p no:cacheprovider tests
step resources 120 $py -m benchmarks.kernel_resources
step report 540 $py -m benchmarks.report --suite kron_ops bottleneck --out "$work/results"
step transforms 540 $py -m benchmarks.report --suite fwht fastfood --out "$work/results"
step models 540 $py -m benchmarks.report --suite models --memory-snapshot kadaptation --out "$work/results"
