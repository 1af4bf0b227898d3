"""Time each layer of the covidct networks alone: minicnn (NumPy / CuPy) against PyTorch.

    python benchmarks/bench_layers.py                  # full: seed and default shapes, batch 12 and 65
    python benchmarks/bench_layers.py --quick          # default shapes, batch 12, 3 repeats (seconds)
    python benchmarks/bench_layers.py --models seed --batches 65 --backends numpy,torch --json layers.json

For every layer of the model (conv, ReLU, max-pool, linear, and the softmax
cross-entropy loss), at the input shape it sees inside the network, this times

* forward:            ``out = layer(x)`` (torch with autograd recording, as in training:
                      minicnn's forward also keeps what its backward needs);
* forward+backward:   gradients reset, ``out = layer(x)``, ``layer.backward(grad_out)``
                      (torch: ``out.backward(grad_out)``). The first conv computes no
                      input gradient on either side (the image needs none).

All backends run in this process with the same weights (minicnn's, copied into
torch) and the same input and upstream gradient. Layer shapes come from
``covidct.model.preset(name)``:
  seed     1x224x224: conv 1->32 3x3 pad 1, pool 2, conv 32->64 3x3, pool 2, FC 193,600 -> 1000 -> 500 -> 2
  default  read from the preset (128x128 input, strided 5x5 conv, ...).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import numpy as np  # noqa: E402

import common  # noqa: E402
import minicnn as mc  # noqa: E402

LAYER_BACKENDS = ("numpy", "cupy", "torch", "torch-cuda")
MODEL_NAMES = ("default", "seed", "tiny")


# -- the layers of a model, with their input shapes ------------------------------------------------

def layer_cases(model_name: str) -> list[dict]:
    """[{name, what, input (C, H, W) or (F,), make(rng) -> minicnn layer, kind}], in network order."""
    from covidct.model import preset
    config = preset(model_name)
    channels, size = config.in_channels, config.input_size
    cases = []
    for index, block in enumerate((config.conv1, config.conv2), start=1):
        def make_conv(rng, c=channels, b=block, first=index == 1):
            conv = mc.Conv2d(c, b.out_channels, b.kernel, b.stride, b.padding, rng=rng)
            conv.needs_input_grad = not first
            return conv
        cases.append({"name": f"conv{index}", "kind": "Conv2d", "input": (channels, size, size), "make": make_conv,
                      "what": f"Conv2d {channels}->{block.out_channels} {block.kernel}x{block.kernel} "
                              f"s{block.stride} p{block.padding}"})
        channels, size = block.out_channels, (size + 2 * block.padding - block.kernel) // block.stride + 1
        cases.append({"name": f"relu{index}", "kind": "ReLU", "input": (channels, size, size),
                      "make": lambda rng: mc.ReLU(), "what": "ReLU"})
        cases.append({"name": f"pool{index}", "kind": "MaxPool2d", "input": (channels, size, size),
                      "make": lambda rng, p=block.pool: mc.MaxPool2d(p), "what": f"MaxPool2d {block.pool}"})
        size //= block.pool
    widths = [channels * size * size, *config.hidden, config.num_classes]
    for index, (fan_in, fan_out) in enumerate(zip(widths, widths[1:]), start=1):
        cases.append({"name": f"fc{index}", "kind": "Linear", "input": (fan_in,),
                      "make": lambda rng, i=fan_in, o=fan_out: mc.Linear(i, o, rng=rng),
                      "what": f"Linear {fan_in}->{fan_out}"})
        if index < len(widths) - 1:
            cases.append({"name": f"relu{index + 2}", "kind": "ReLU", "input": (fan_out,),
                          "make": lambda rng: mc.ReLU(), "what": "ReLU"})
    cases.append({"name": "loss", "kind": "SoftmaxCrossEntropy", "input": (config.num_classes,),
                  "make": lambda rng: mc.SoftmaxCrossEntropy(), "what": "SoftmaxCrossEntropy"})
    return cases


# -- runners: (forward, forward+backward, sync) per backend ------------------------------------------

def minicnn_runner(layer, x, grad, labels, device: str):
    if device == "gpu":
        layer.to("gpu")
        x, grad, labels = (mc.to_device(a, "gpu") for a in (x, grad, labels))
    params = layer.parameters()
    if isinstance(layer, mc.SoftmaxCrossEntropy):
        def forward():
            return layer(x, labels)

        def forward_backward():
            layer(x, labels)
            return layer.backward()
    else:
        def forward():
            return layer(x)

        def forward_backward():
            for p in params:
                p.grad = None
            layer(x)
            return layer.backward(grad)
    return forward, forward_backward, (mc.synchronize if device == "gpu" else None)


def torch_runner(layer, x, grad, labels, device: str):
    import torch
    import torch.nn.functional as F
    torch.backends.cudnn.allow_tf32 = False          # float32 like minicnn (cuDNN's default is TF32)
    x_t = torch.from_numpy(x).to(device)
    labels_t = torch.from_numpy(labels).to(device)
    needs_input_grad = getattr(layer, "needs_input_grad", True)
    x_t.requires_grad_(needs_input_grad)
    if isinstance(layer, mc.SoftmaxCrossEntropy):
        def forward():
            return F.cross_entropy(x_t, labels_t)

        def forward_backward():
            x_t.grad = None
            loss = F.cross_entropy(x_t, labels_t)
            loss.backward()
    else:
        module = common.torch_layer_from(layer).to(device)
        params = list(module.parameters())
        grad_t = torch.from_numpy(grad).to(device)

        def forward():
            return module(x_t)

        def forward_backward():
            for p in params:
                p.grad = None
            x_t.grad = None
            module(x_t).backward(grad_t)
    return forward, forward_backward, (torch.cuda.synchronize if device == "cuda" else None)


def bench_case(case: dict, batch: int, backends: list[str], repeats: int, warmup: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *case["input"]), dtype=np.float32)
    labels = rng.integers(0, case["input"][0], size=batch).astype(np.int64)
    reference = case["make"](np.random.default_rng(seed + 1))         # only for the output shape
    out_shape = () if isinstance(reference, mc.SoftmaxCrossEntropy) else reference(x).shape
    del reference                                                     # (seed's fc1 alone is 0.8 GB)
    gc.collect()
    grad = rng.standard_normal(out_shape, dtype=np.float32)

    rows = []
    for backend in backends:
        layer = case["make"](np.random.default_rng(seed + 1))         # the same weights, a fresh copy
        if backend in ("minicnn-numpy", "minicnn-cupy"):
            runner = minicnn_runner(layer, x, grad, labels, "gpu" if backend == "minicnn-cupy" else "cpu")
        else:
            runner = torch_runner(layer, x, grad, labels, "cuda" if backend == "torch-cuda" else "cpu")
            layer = None                                              # torch holds its own copy
            gc.collect()
        forward, forward_backward, sync = runner
        for pass_name, fn in (("forward", forward), ("forward+backward", forward_backward)):
            timing = common.time_it(fn, repeats=repeats, warmup=warmup, sync=sync)
            rows.append({"layer": case["name"], "op": case["what"], "kind": case["kind"],
                         "input_shape": [batch, *case["input"]], "output_shape": list(out_shape),
                         "pass": pass_name, "backend": backend,
                         "median_s": timing["median"], "min_s": timing["min"], "max_s": timing["max"],
                         "times_s": timing["times"], "images_per_s": batch / timing["median"]})
        del layer, runner, forward, forward_backward
        gc.collect()
    return rows


def add_ratios(rows: list[dict]) -> None:
    index = {(r["model"], r["batch"], r["layer"], r["pass"], r["backend"]): r for r in rows}
    for row in rows:
        reference = common.REFERENCE.get(row["backend"])
        other = index.get((row["model"], row["batch"], row["layer"], row["pass"], reference)) if reference else None
        row["ratio_torch"] = row["median_s"] / other["median_s"] if other else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None, help="comma list from " + ",".join(MODEL_NAMES)
                        + " (default: seed,default; --quick: default)")
    parser.add_argument("--batches", default=None, help="comma list (default 12,65; --quick: 12)")
    parser.add_argument("--backends", default=",".join(LAYER_BACKENDS),
                        help="comma list from " + ",".join(LAYER_BACKENDS) + " (unusable ones are skipped)")
    parser.add_argument("--layers", default=None, help="only these layers, e.g. conv1,conv2,fc1")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default 2; --quick: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="limit NumPy's BLAS and torch to N threads (default: the libraries' own defaults)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--json", metavar="FILE", help="also write the machine, settings and rows as JSON")
    args = parser.parse_args(argv)
    models = common.parse_list(args.models or ("default" if args.quick else "seed,default"), MODEL_NAMES)
    batches = common.parse_list(args.batches or ("12" if args.quick else "12,65"), kind=int)
    keys = common.parse_list(args.backends, LAYER_BACKENDS)
    repeats = args.repeats or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    only = set(common.parse_list(args.layers)) if args.layers else None

    machine = common.machine_description()
    backends, skipped = common.usable_backends(keys)
    if any(b.startswith("torch") for b in backends):
        import torch  # noqa: F401  (imported before set_threads so that it is limited too)
    common.set_threads(args.threads)

    rows = []
    start = time.perf_counter()
    for model in models:
        for batch in batches:
            for number, case in enumerate(layer_cases(model)):
                if only and case["name"] not in only:
                    continue
                case_rows = bench_case(case, batch, backends, repeats, warmup, seed=1000 + number)
                for row in case_rows:
                    row.update(model=model, batch=batch)
                rows += case_rows
                summary = ", ".join(f"{r['backend']} {r['pass']} {r['median_s'] * 1e3:.2f} ms" for r in case_rows)
                print(f"[{time.perf_counter() - start:6.1f} s] {model} batch {batch} {case['name']}: {summary}",
                      file=sys.stderr, flush=True)
    add_ratios(rows)

    print(f"# minicnn per-layer benchmark ({'quick' if args.quick else 'full'})\n")
    print(common.describe_markdown(machine))
    print(f"- repeats: {repeats} timed after {warmup} warm-up; threads: {args.threads or 'library defaults'}; "
          f"all backends in one process")
    for backend, why in skipped.items():
        print(f"- skipped {backend}: {why}")
    headers = ["layer", "op", "input", "pass", "backend", "median ms", "min-max ms", "img/s", "÷ torch"]
    for model in models:
        for batch in batches:
            table = [[r["layer"], r["op"], "x".join(map(str, r["input_shape"])), r["pass"], r["backend"],
                      common.ms(r["median_s"]),
                      f"{common.format_cell(common.ms(r['min_s']))}-{common.format_cell(common.ms(r['max_s']))}",
                      r["images_per_s"], r["ratio_torch"]]
                     for r in rows if r["model"] == model and r["batch"] == batch]
            if table:
                print(f"\n## {model} model shapes, batch {batch}\n")
                print(common.markdown_table(headers, table, align="lllllrlrr"))
    print("\n÷ torch: minicnn's median time divided by PyTorch's on the same device and layer "
          "(2.0 = twice as slow). img/s: batch size / median time.")
    if args.json:
        common.write_json(args.json, {
            "benchmark": "layers", "machine": machine,
            "settings": {"models": models, "batches": batches, "backends": backends, "repeats": repeats,
                         "warmup": warmup, "threads": args.threads, "quick": args.quick,
                         "layers": sorted(only) if only else None},
            "skipped": skipped, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
