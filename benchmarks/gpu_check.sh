#!/usr/bin/env bash
# The GPU half of issues 5 and 14, as one script for a machine with an NVIDIA GPU, CuPy and PyTorch:
#   1. the CuPy tests (failing, not skipping, without a GPU): with the fused kernels (the default), the
#      kernel-vs-readable tests, every GPU test again on the readable path (MINICNN_CUDA_KERNELS=0),
#      and the NCCL communicator test (needs mpiexec: pip install -e ".[mpi]" brings the mpich wheel);
#   2. train-step benchmarks against PyTorch CUDA in float32 (and once with its default TF32 convolutions):
#      `default` and LeNet-sized with the fused kernels and on the readable path, ResNet-18, and each
#      layer of the seed CNN alone;
#   3. gpu_sync_probe.py: does a training step ever wait for the GPU (a device-to-host copy)? and
#      gpu_profile_layers.py: where a ResNet-18 step's time goes;
#   4. the quick-start example on the GPU.
#
#     bash benchmarks/gpu_check.sh OUTDIR        # run from the repository root
#
# It needs no install (PYTHONPATH=.) and writes its logs and JSON into OUTDIR; each step has its own
# time limit so that one slow step cannot eat the others (about 4 minutes in all on an H200).
set -u
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
py=${PYTHON:-python3}
unset MINICNN_CUDA_KERNELS

{
  date -u; uname -a; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  nproc; uptime; $py -c "import sys, numpy, cupy, torch; print(sys.version); print('numpy', numpy.__version__,
'cupy', cupy.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== GPU tests, fused kernels (default)"
  MINICNN_REQUIRE_GPU=1 timeout 100 $py -m pytest -q tests/test_gpu.py tests/test_cuda_kernels.py \
      -p no:cacheprovider 2>&1 | tail -40
  echo "== GPU tests, readable path (MINICNN_CUDA_KERNELS=0)"
  MINICNN_REQUIRE_GPU=1 MINICNN_CUDA_KERNELS=0 timeout 60 $py -m pytest -q tests/test_gpu.py \
      -p no:cacheprovider 2>&1 | tail -30
  echo "== NCCL communicator (mpiexec: $(command -v mpiexec || echo none))"
  MINICNN_REQUIRE_GPU=1 timeout 60 $py -m pytest -q tests/test_distributed.py -k nccl -rs \
      -p no:cacheprovider 2>&1 | tail -30
} > "$out/tests.log" 2>&1
grep -E "passed|failed|error" "$out/tests.log"

{
  echo "== train step: default, lenet; fused kernels; PyTorch float32"
  timeout 90 $py benchmarks/bench_train_step.py --models default,lenet --batches 12,65 \
      --backends cupy,torch-cuda --isolate library --json "$out/train_step.json"
  echo "== train step: PyTorch CUDA with its default TF32 convolutions"
  timeout 60 $py benchmarks/bench_train_step.py --models default,lenet --batches 12,65 \
      --backends torch-cuda --isolate library --tf32 --json "$out/train_step_torch_tf32.json"
  echo "== train step: readable path (MINICNN_CUDA_KERNELS=0)"
  MINICNN_CUDA_KERNELS=0 timeout 60 $py benchmarks/bench_train_step.py --models default,lenet --batches 12,65 \
      --backends cupy --isolate library --json "$out/train_step_readable.json"
  echo "== train step: resnet18"
  timeout 100 $py benchmarks/bench_train_step.py --models resnet18 --batches 8,32 \
      --backends cupy,torch-cuda --repeats 5 --isolate library --json "$out/train_step_resnet18.json"
} > "$out/bench.md" 2>&1
echo "bench done"

{
  echo "== sync probe, fused kernels"
  timeout 45 $py benchmarks/gpu_sync_probe.py --models default,lenet
  echo "== sync probe, readable path"
  MINICNN_CUDA_KERNELS=0 timeout 45 $py benchmarks/gpu_sync_probe.py --models default,lenet
  echo "== where a ResNet-18 step's time goes (batch 8)"
  timeout 45 $py benchmarks/gpu_profile_layers.py --model resnet18 --batch 8
} > "$out/sync.log" 2>&1
cat "$out/sync.log"

{
  echo "== layers of the seed CNN, batch 65"
  timeout 80 $py benchmarks/bench_layers.py --models seed --batches 65 --backends cupy,torch-cuda
} > "$out/layers.md" 2>&1
echo "layers done"

{
  echo "== examples/train_covid.py --device gpu"
  start=$SECONDS
  timeout 100 $py examples/train_covid.py --device gpu --no-progress --out /tmp/gpu-example 2>&1 | tail -45
  echo "wall time: $((SECONDS - start)) s"
} > "$out/example.log" 2>&1
grep -E "accuracy|wall time" "$out/example.log" | tail -3
echo "done: $(ls "$out")"
