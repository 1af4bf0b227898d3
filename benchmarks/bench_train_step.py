"""Time one training step and one inference pass: minicnn (NumPy / CuPy) against PyTorch.

    python benchmarks/bench_train_step.py                  # full: default, lenet, seed at batch 12 and 65
    python benchmarks/bench_train_step.py --quick          # default + lenet, batch 12, 2 repeats (< 1 min)
    python benchmarks/bench_train_step.py --models default --batches 12,65 --backends numpy,torch --rounds 5
                                                           # five turns each, times pooled: steadier ratios
    python benchmarks/bench_train_step.py --models resnet18 --batches 8,32 --backends numpy,torch,torch-cl
                                                           # ResNet-18 at 1x224x224 (covidct --model resnet18)
    python benchmarks/bench_train_step.py --models default --batches 32 --backends numpy,torch \\
        --repeats 20 --threads 1 --json results.json

A training step is ``zero_grad, forward, loss, backward, SGD(momentum=0.9) step``
in train mode (dropout on); inference is one eval-mode forward under ``no_grad``
(``minicnn.no_grad()`` / ``torch.no_grad()``). Every backend gets the same network with the same weights (built
by minicnn from seed 0; torch loads its state_dict) and the same batch.

Each (model, batch, backend) runs in a fresh Python process, so that peak memory
is measured for that case alone (see common.py and README.md) and no backend's
caches or threads leak into another's timing.

Backends: numpy (minicnn-numpy), cupy (minicnn-cupy, when minicnn.gpu_available()),
torch (torch-cpu), torch-cl (torch-cpu with channels_last model and input),
torch-cuda. Those not usable here are skipped with a note.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402

import common  # noqa: E402

MODEL_NAMES = ("default", "lenet", "seed", "tiny", "deep", "resnet18")
LR, MOMENTUM = 1e-3, 0.9
# Batch sizes when --batches is not given: (full run, --quick). ResNet-18 at 224x224 costs ~15x the
# default CNN per image, so it gets smaller batches (8 and 32 keep a full minicnn-NumPy run at minutes).
DEFAULT_BATCHES = {"resnet18": ((8, 32), (4,))}
OTHER_BATCHES = ((12, 65), (12,))
NUMPY_MEMORY_LIMIT = 8 * common.GIB   # the seed preset at batch 65 must stay below this on minicnn-numpy


# -- models ------------------------------------------------------------------------------------

def build_lenet(seed: int = 0):
    """LeNet-sized reference: conv 1->6 5x5, ReLU, pool 2, conv 6->16 5x5, ReLU, pool 2,
    FC 16*53*53 = 44,944 -> 120 -> ReLU -> 84 -> ReLU -> 2, on 1x224x224."""
    import minicnn as mc
    rng = np.random.default_rng(seed)
    first = mc.Conv2d(1, 6, 5, rng=rng)
    first.needs_input_grad = False
    return mc.Sequential(
        first, mc.ReLU(), mc.MaxPool2d(2),
        mc.Conv2d(6, 16, 5, rng=rng), mc.ReLU(), mc.MaxPool2d(2),
        mc.Flatten(),
        mc.Linear(16 * 53 * 53, 120, rng=rng), mc.ReLU(),
        mc.Linear(120, 84, rng=rng), mc.ReLU(),
        mc.Linear(84, 2, rng=rng))


def build_resnet18(seed: int = 0):
    """What ``covidct train --model resnet18`` trains: torchvision's ResNet-18 with a 1-channel
    conv1 and a 2-way fc, on 1x224x224. PyTorch gets the same network from
    ``torch_resnet.py`` (through common.torch_layer_from), with these weights."""
    from minicnn.models import resnet18
    return resnet18(num_classes=2, in_channels=1, rng=np.random.default_rng(seed))


def build(name: str, seed: int = 0):
    """(minicnn model, input shape (C, H, W), number of classes)."""
    if name == "lenet":
        return build_lenet(seed), (1, 224, 224), 2
    if name == "resnet18":
        return build_resnet18(seed), (1, 224, 224), 2
    from covidct.model import build_model, preset
    config = preset(name)
    return build_model(config, seed), (config.in_channels, config.input_size, config.input_size), config.num_classes


def make_batch(batch: int, shape, classes: int):
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    y = rng.integers(0, classes, size=batch).astype(np.int64)
    return x, y


def training_step(model_name: str, batch: int, device: str = "gpu"):
    """(model, optimizer, step) for the GPU probes: ``build(model_name)`` on ``device`` with one fixed
    batch, and ``step()``, one SGD training step on it (forward, loss, backward, update)."""
    import minicnn as mc
    from minicnn import optim
    model, shape, classes = build(model_name)
    x, y = make_batch(batch, shape, classes)
    model.to(device)
    x, y = mc.to_device(x, device), mc.to_device(y, device)
    criterion = mc.SoftmaxCrossEntropy()
    optimizer = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    model.train()

    def step():
        optimizer.zero_grad()
        criterion(model(x), y)
        model.backward(criterion.backward())
        optimizer.step()
    return model, optimizer, step


# -- one case, in the child process ------------------------------------------------------------

def clear_saved(model) -> None:
    """Drop activations a minicnn model still holds from its last forward, and its layers' reusable
    work buffers (the model at rest: so the memory step counts the buffers as extra memory)."""
    model.release_saved()


def run_case(spec: dict) -> dict:
    """Build, warm up, measure memory of one step, then time train steps and inference."""
    model_name, batch, backend = spec["model"], spec["batch"], spec["backend"]
    repeats, warmup = spec["repeats"], max(1, spec["warmup"])
    uses_torch = backend.startswith("torch")
    if uses_torch:
        import torch
    common.set_threads(spec.get("threads"))

    model, shape, classes = build(model_name)
    params = sum(int(np.prod(p.shape)) for p in model.parameters())
    x, y = make_batch(batch, shape, classes)
    result = {"model": model_name, "batch": batch, "backend": backend, "params": params,
              "input_shape": [batch, *shape], "numpy_blas": common.numpy_blas(), "pid": os.getpid()}

    if backend in ("minicnn-numpy", "minicnn-cupy"):
        import minicnn as mc
        from minicnn import optim
        if backend == "minicnn-cupy":
            model.to("gpu")
            x, y = mc.to_device(x, "gpu"), mc.to_device(y, "gpu")
            sync, memory = mc.synchronize, lambda: common.GpuPeakMemory("cupy")
            result["device"] = common.gpu_description()["name"]
        else:
            sync, memory = None, common.HostPeakMemory
            result["device"] = common.cpu_model()
        criterion = mc.SoftmaxCrossEntropy()
        optimizer = optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        model.eval()
        result["initial_eval_loss"] = float(mc.as_numpy(criterion(model(x), y)))
        clear_saved(model)
        model.train()

        def train_step():
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            model.backward(criterion.backward())
            optimizer.step()
            return loss

        def infer():
            with mc.no_grad():         # as torch's: nothing kept for a backward
                return model(x)

        def at_rest():
            optimizer.zero_grad()
            clear_saved(model)

        def last_loss(loss):
            return float(mc.as_numpy(loss))
        result["threads"] = (f"{result['numpy_blas']}; minicnn pool {mc.fast.num_threads()}"
                             if backend == "minicnn-numpy" else "CuPy")
    else:
        device = "cuda" if backend == "torch-cuda" else "cpu"
        net = common.torch_layer_from(model)
        del model
        gc.collect()
        net = net.to(device)
        x_t, y_t = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
        if backend == "torch-cpu-cl":
            net = net.to(memory_format=torch.channels_last)
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        if device == "cuda":
            # float32 against float32: PyTorch's cuDNN convolutions use TF32 tensor cores by default
            # (10-bit mantissa), minicnn-CuPy's cuBLAS products full float32; --tf32 allows it.
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = bool(spec.get("tf32"))
            sync, memory = torch.cuda.synchronize, lambda: common.GpuPeakMemory("torch")
            result["device"] = torch.cuda.get_device_name(0)
        else:
            sync, memory = None, common.HostPeakMemory
            result["device"] = common.cpu_model()
        criterion = torch.nn.CrossEntropyLoss()
        optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
        net.eval()
        with torch.no_grad():
            result["initial_eval_loss"] = float(criterion(net(x_t), y_t))
        net.train()

        def train_step():
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(net(x_t), y_t)
            loss.backward()
            optimizer.step()
            return loss

        def infer():
            with torch.no_grad():
                return net(x_t)

        def at_rest():
            optimizer.zero_grad(set_to_none=True)

        def last_loss(loss):
            return float(loss)
        result["threads"] = (f"torch {torch.get_num_threads()} threads" if device == "cpu"
                             else f"CUDA {torch.version.cuda}")
        result["torch_threads"] = torch.get_num_threads()

    sync = sync or (lambda: None)
    for mode, fn in (("train", train_step), ("infer", infer)):
        if mode == "infer":
            (model if backend.startswith("minicnn") else net).eval()
        for _ in range(warmup):
            out = fn()
        sync()
        at_rest()
        with memory() as mem:          # one extra step, outside the timed loop
            out = fn()
            sync()
        timing = common.time_it(fn, repeats=repeats, warmup=0, sync=sync)
        if mode == "train":
            result["train_loss_memory_step"] = last_loss(out)
        result[mode] = dict(timing, mem_extra_bytes=mem.extra, mem_peak_bytes=mem.peak,
                            mem_before_bytes=mem.before, mem_method=mem.method)
        del out
    return result


def run_cases(specs: list[dict]) -> list[dict]:
    """Run cases one after the other in this process; a case that raises becomes an error entry."""
    results = []
    for spec in specs:
        try:
            results.append(run_case(spec))
        except Exception as error:  # report and go on with the other cases
            results.append(dict(spec, error=f"{type(error).__name__}: {error}"))
        gc.collect()
    return results


def child_main(specs_json: str, out_path: str) -> int:
    Path(out_path).write_text(json.dumps(run_cases(json.loads(specs_json))))
    return 0


def run_in_child(specs: list[dict]) -> list[dict]:
    """Run the cases in a fresh Python process (so each is measured without the others' memory)."""
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        out = Path(folder) / "result.json"
        process = subprocess.run([sys.executable, __file__, "--child", json.dumps(specs), "--child-out", str(out)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if process.returncode != 0 or not out.exists():
            tail = (process.stderr or process.stdout or "").strip().splitlines()[-5:]
            why = ("killed (out of memory?)" if process.returncode in (-9, 137)
                   else f"child exit {process.returncode}")
            return [dict(spec, error=f"{why}: " + " | ".join(tail)) for spec in specs]
        return json.loads(out.read_text())


# How cases share processes: "case" = a fresh process per (model, batch, backend);
# "library" = one process per library (numpy / cupy / torch CPU incl. channels_last / torch CUDA);
# "none" = all in this process.
LIBRARY = {"minicnn-numpy": "numpy", "minicnn-cupy": "cupy", "torch-cpu": "torch", "torch-cpu-cl": "torch",
           "torch-cuda": "torch-cuda"}


def pool_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One result per case from several rounds of the same cases: the timed steps of every round
    pooled (median, min, max over all of them), the largest memory figures; a case that failed in
    any round is reported as that error."""
    pooled = []
    for runs in zip(*rounds):
        failed = next((run for run in runs if "error" in run), None)
        if failed is not None or len(runs) == 1:
            pooled.append(failed or runs[0])
            continue
        result = dict(runs[0], rounds=len(runs))
        for mode in ("train", "infer"):
            times = [t for run in runs for t in run[mode]["times"]]
            result[mode] = dict(runs[0][mode], times=times, repeats=len(times), median=statistics.median(times),
                                min=min(times), max=max(times), mean=statistics.fmean(times),
                                round_medians=[run[mode]["median"] for run in runs])
            for key in ("mem_extra_bytes", "mem_peak_bytes"):
                values = [run[mode][key] for run in runs if run[mode][key] is not None]
                result[mode][key] = max(values) if values else None
        pooled.append(result)
    return pooled


def rows_from(results: list[dict]) -> list[dict]:
    """One row per (model, batch, backend, mode), with ratios to the torch runs of the same case."""
    rows = []
    for result in results:
        if "error" in result:
            continue
        for mode in ("train", "infer"):
            timing = result[mode]
            rows.append({
                "model": result["model"], "batch": result["batch"], "backend": result["backend"], "mode": mode,
                "median_s": timing["median"], "min_s": timing["min"], "max_s": timing["max"],
                "times_s": timing["times"], "repeats": timing["repeats"],
                "images_per_s": result["batch"] / timing["median"],
                "mem_extra_bytes": timing["mem_extra_bytes"], "mem_peak_bytes": timing["mem_peak_bytes"],
                "mem_method": timing["mem_method"],
                "params": result["params"], "device": result["device"], "threads": result["threads"],
                "initial_eval_loss": result["initial_eval_loss"],
            })
    index = {(r["model"], r["batch"], r["backend"], r["mode"]): r for r in rows}
    for row in rows:
        key = (row["model"], row["batch"])
        reference = common.REFERENCE.get(row["backend"])
        torch_row = index.get((*key, reference, row["mode"])) if reference else None
        row["ratio_torch"] = row["median_s"] / torch_row["median_s"] if torch_row else None
        cl_row = index.get((*key, "torch-cpu-cl", row["mode"]))
        row["ratio_torch_cl"] = (row["median_s"] / cl_row["median_s"]
                                 if cl_row and row["backend"] == "minicnn-numpy" else None)
        row["over_memory_limit"] = bool(row["backend"] == "minicnn-numpy" and row["mem_peak_bytes"]
                                        and row["mem_peak_bytes"] > NUMPY_MEMORY_LIMIT)
    return rows


def print_report(machine: dict, args, rows: list[dict], results: list[dict], skipped: dict) -> None:
    print(f"# minicnn training-step benchmark ({'quick' if args.quick else 'full'})\n")
    print(common.describe_markdown(machine))
    print(f"- repeats: {args.repeats} timed after {args.warmup} warm-up (+1 untimed memory step); "
          f"SGD lr={LR} momentum={MOMENTUM}; threads: {args.threads or 'library defaults'}; "
          f"processes: one per {args.isolate if args.isolate != 'none' else 'run (all in one)'}"
          + (f"; {args.rounds} rounds, the backends taking turns, times pooled" if args.rounds > 1 else "")
          + f"; PyTorch CUDA TF32 {'allowed' if args.tf32 else 'off (float32 like minicnn)'}"
          + f"; MINICNN_CUDA_KERNELS={os.environ.get('MINICNN_CUDA_KERNELS', '(unset)')}")
    for backend, why in skipped.items():
        print(f"- skipped {backend}: {why}")
    print()
    headers = ["model", "batch", "backend", "mode", "img/s", "median ms", "min-max ms", "÷ torch", "÷ torch-cl",
               "extra MiB", "peak MiB", "threads / device"]
    table = []
    for r in rows:
        where = r["threads"] if r["backend"] in ("minicnn-numpy", "torch-cpu", "torch-cpu-cl") else r["device"]
        table.append([r["model"], r["batch"], r["backend"], r["mode"], r["images_per_s"], common.ms(r["median_s"]),
                      f"{common.format_cell(common.ms(r['min_s']))}-{common.format_cell(common.ms(r['max_s']))}",
                      r["ratio_torch"], r["ratio_torch_cl"], common.mib(r["mem_extra_bytes"]),
                      common.mib(r["mem_peak_bytes"]) if r["mem_peak_bytes"] else None,
                      where + (" **OVER 8 GiB**" if r["over_memory_limit"] else "")])
    print(common.markdown_table(headers, table, align="lrllrrlrrrrl"))
    print()
    methods = sorted({r["mem_method"] for r in rows})
    print(f"÷ torch: median time divided by the default-layout PyTorch run on the same device "
          f"(2.0 = twice as slow); ÷ torch-cl: divided by PyTorch CPU channels_last. "
          f"extra MiB: peak memory of one step above the resting model (RSS on CPU, memory pool on GPU); "
          f"peak MiB: the whole process's peak RSS (CPU) or pool/allocator total (GPU) during that step. "
          f"Memory method(s): {', '.join(methods) or '-'}.")
    losses = {}
    for r in rows:
        losses.setdefault((r["model"], r["batch"]), set()).add(round(r["initial_eval_loss"], 4))
    mismatched = [key for key, values in losses.items() if len(values) > 1]
    if mismatched:
        print(f"\nWARNING: the backends' initial eval losses differ for {mismatched}: networks not identical?")
    numpy_peaks = [r for r in rows if r["backend"] == "minicnn-numpy" and r["mem_peak_bytes"]]
    if numpy_peaks:
        worst = max(numpy_peaks, key=lambda r: r["mem_peak_bytes"])
        print(f"\nminicnn-numpy peak process RSS: {worst['mem_peak_bytes'] / common.GIB:.2f} GiB "
              f"({worst['model']}, batch {worst['batch']}, {worst['mode']}); limit 8 GiB: "
              f"{'EXCEEDED' if worst['over_memory_limit'] else 'ok'}")
    for result in results:
        if "error" in result:
            print(f"\nERROR {result['model']} batch {result['batch']} {result['backend']}: {result['error']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma list from " + ",".join(MODEL_NAMES)
                        + " (default: default,lenet,seed; --quick: default,lenet)")
    parser.add_argument("--batches", default=None,
                        help="comma list (default 12,65, resnet18 8,32; --quick: 12, resnet18 4)")
    parser.add_argument("--backends", default=",".join(common.BACKENDS),
                        help="comma list from " + ",".join(common.BACKENDS) + " (unusable ones are skipped)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; --quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; --quick: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="limit NumPy's BLAS and torch to N threads (default: the libraries' own defaults)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--isolate", choices=("case", "library", "none"), default=None,
                        help="process per case (default: cleanest memory numbers), per library "
                             "(--quick's default: pays torch's import once), or none (all in this process)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every case this many times, the backends taking turns (all cases once, then "
                             "again, ...); a case's times are pooled over its rounds, so load that comes and "
                             "goes on a shared machine falls on both libraries alike (default 1)")
    parser.add_argument("--tf32", action="store_true",
                        help="let PyTorch CUDA use TF32 tensor cores (its default for convolutions); without it "
                             "both libraries compute in float32")
    parser.add_argument("--json", metavar="FILE", help="also write the machine, settings and rows as JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.child_out)

    args.models = args.models or ("default,lenet" if args.quick else "default,lenet,seed")
    args.repeats = args.repeats or (2 if args.quick else 10)
    args.isolate = args.isolate or ("library" if args.quick else "case")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    models = common.parse_list(args.models, MODEL_NAMES)
    if args.batches:
        batches = {model: common.parse_list(args.batches, kind=int) for model in models}
    else:
        batches = {model: list(DEFAULT_BATCHES.get(model, OTHER_BATCHES)[1 if args.quick else 0])
                   for model in models}
    keys = common.parse_list(args.backends, common.BACKENDS)

    machine = common.machine_description()
    backends, skipped = common.usable_backends(keys)

    specs = [{"model": model, "batch": batch, "backend": backend, "repeats": args.repeats,
              "warmup": args.warmup, "threads": args.threads, "tf32": args.tf32}
             for model in models for batch in batches[model] for backend in backends]
    if args.isolate == "case":
        groups = [[spec] for spec in specs]
    elif args.isolate == "library":
        groups = {}
        for spec in specs:
            groups.setdefault(LIBRARY[spec["backend"]], []).append(spec)
        groups = list(groups.values())
    else:
        groups = [specs]
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    rounds = []
    start = time.perf_counter()
    for round_index in range(args.rounds):
        results = []
        for group in groups:
            group_start = time.perf_counter()
            done = run_cases(group) if args.isolate == "none" else run_in_child(group)
            results += done
            for result in done:
                status = result.get("error") or (f"train {result['train']['median'] * 1e3:.1f} ms, "
                                                 f"infer {result['infer']['median'] * 1e3:.1f} ms")
                print(f"[{time.perf_counter() - start:6.1f} s] round {round_index + 1}/{args.rounds} "
                      f"{result['model']} batch {result['batch']} {result['backend']}: {status}",
                      file=sys.stderr, flush=True)
            print(f"         ({len(group)} case(s) in {time.perf_counter() - group_start:.1f} s)",
                  file=sys.stderr, flush=True)
        rounds.append(results)
    results = pool_rounds(rounds)
    order = {(s["model"], s["batch"], s["backend"]): i for i, s in enumerate(specs)}
    results.sort(key=lambda r: order[(r["model"], r["batch"], r["backend"])])
    rows = rows_from(results)
    print_report(machine, args, rows, results, skipped)
    if args.json:
        common.write_json(args.json, {
            "benchmark": "train_step", "machine": machine,
            "settings": {"models": models, "batches": batches, "backends": backends, "repeats": args.repeats,
                         "warmup": args.warmup, "threads": args.threads, "quick": args.quick, "rounds": args.rounds,
                         "isolate": args.isolate, "lr": LR, "momentum": MOMENTUM, "tf32": args.tf32,
                         "minicnn_cuda_kernels": os.environ.get("MINICNN_CUDA_KERNELS")},
            "skipped": skipped, "rows": rows,
            "errors": [r for r in results if "error" in r]})
    failed = any("error" in r for r in results) or any(r["over_memory_limit"] for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
