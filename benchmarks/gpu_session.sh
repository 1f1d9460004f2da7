#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call, from the repository root:
#
#     KRON_KERNELS_COMMIT=<git rev-parse HEAD, run here> bash benchmarks/gpu_session.sh "$OUT" [build] [tests] [resources] [report] [models]
#
# (the device machine gets the working tree without .git: the commit must travel in the
# environment for the results' provenance; commit before the call so it names the code run).
# builds the extension in place for the local GPU only, runs `pytest -m gpu`, the ptxas
# resource report, the op-level benchmark report and the model-level one (ViT-B/16, batch 64,
# bf16, with a torch.cuda.memory snapshot of a KAdaptation step) -- all five when no step is
# named; name fewer to fit a call's time limit, e.g. `build tests` then `build report` then
# `build models`); logs and results land
# under the given folder (results/<device>/ there is what to commit under
# benchmarks/results/). Each step is time-boxed so that one hang cannot eat the lease.
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR [build] [tests] [resources] [report] [models]}
shift
steps=${*:-build tests resources report models}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS CMD...: run, log to $out/NAME.log, keep going on failure
    local name=$1 limit=$2; shift 2
    case " $steps " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "== $name rc=$rc"; tail -n 25 "$out/$name.log"
}

{ nvidia-smi; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"; echo "commit ${KRON_KERNELS_COMMIT:-unknown}"; } > "$out/env.txt" 2>&1
cat "$out/env.txt"
if ls csrc/*.cu csrc/*.cpp > /dev/null 2>&1; then
    arch=$($py -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    step build 300 env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 $py setup.py build_ext --inplace
fi
step tests 420 $py -m pytest -m gpu -q -p no:cacheprovider tests
step resources 120 $py -m benchmarks.kernel_resources
step report 540 $py -m benchmarks.report --suite kron_ops fwht bottleneck --out "$out/results"
step models 540 $py -m benchmarks.report --suite models --memory-snapshot kadaptation --out "$out/results"
