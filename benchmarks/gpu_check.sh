#!/usr/bin/env bash
# The GPU half of issue 5, as one script for a machine with an NVIDIA GPU, CuPy and PyTorch:
# the CuPy tests (failing, not skipping, without a GPU), the full train-step and layer benchmarks
# against PyTorch CUDA (and minicnn-NumPy on that machine's CPU), and the quick-start example on the GPU.
#
#     bash benchmarks/gpu_check.sh OUTDIR        # run from the repository root
#
# It needs no install (PYTHONPATH=.) and writes six files into OUTDIR; each step has its own time limit
# so that one slow step cannot eat the others.
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
py=${PYTHON:-python3}

{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc; $py -c "import sys, numpy, cupy, torch; print(sys.version); print('numpy', numpy.__version__,
'cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== GPU tests"
  MINICNN_REQUIRE_GPU=1 timeout 150 $py -m pytest tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -60
} > "$out/tests.log" 2>&1

{
  echo "== train step: default, lenet"
  timeout 150 $py benchmarks/bench_train_step.py --models default,lenet --batches 12,65 \
      --backends numpy,cupy,torch-cuda --isolate library --json "$out/train_step.json"
  echo "== train step: seed"
  timeout 90 $py benchmarks/bench_train_step.py --models seed --batches 12,65 \
      --backends cupy,torch-cuda --isolate library --json "$out/train_step_seed.json"
  echo "== layers"
  timeout 90 $py benchmarks/bench_layers.py --backends cupy,torch-cuda --json "$out/layers.json"
} > "$out/bench.md" 2>&1

{
  echo "== examples/train_covid.py --device gpu"
  start=$SECONDS
  timeout 120 $py examples/train_covid.py --device gpu --no-progress --out /tmp/gpu-example 2>&1 | tail -45
  echo "wall time: $((SECONDS - start)) s"
} > "$out/example.log" 2>&1
echo "done: $(ls "$out")"
