"""Shared helpers of the benchmark scripts: machine description, timing, memory, output.

Imported by ``bench_layers.py`` and ``bench_train_step.py`` (which put this folder
and the repository root on ``sys.path``). Nothing here imports torch or CuPy
at module level: both are optional, and a child process that benchmarks
minicnn-NumPy should not pay for (or be measured with) torch's libraries.

Timing
    ``time_it(fn, repeats, warmup, sync)`` runs ``fn`` ``warmup`` times, then
    ``repeats`` timed times, calling ``sync()`` before every clock read so that
    queued GPU work is counted (``minicnn.synchronize`` / ``torch.cuda.synchronize``).
    The garbage collector is paused during the timed loop.

Peak memory (host)
    ``HostPeakMemory`` measures the peak resident set size (RSS) reached while
    a block of code runs, minus the RSS just before it:

    * "vmhwm-reset" (Linux >= 4.0, the default): write "5" to
      /proc/self/clear_refs, which resets the kernel's high-water mark VmHWM to
      the current RSS; run the code; read VmHWM from /proc/self/status. The
      kernel updates VmHWM on every page it maps, so no short-lived peak is missed.
    * "sampled" (fallback where clear_refs is not writable): a thread reads
      /proc/self/statm every 0.5 ms; a peak shorter than that can be missed,
      so the number is a lower bound.
    * "unavailable" on systems without /proc (sizes are reported as None).

    Before the block, the garbage collector runs and glibc's ``malloc_trim(0)``
    hands freed heap pages back to the OS; otherwise memory that a warm-up step
    freed would stay resident, the measured step would reuse it, and a library
    that allocates through malloc (torch CPU) would seem to need no memory.

    Large NumPy/torch buffers are mmap'ed and returned to the OS when freed, so
    RSS follows the live arrays closely. bench_train_step also measures every
    case in a fresh process (by default), so the process peak is that case's alone.

Peak memory (GPU)
    ``GpuPeakMemory``: for CuPy, the default memory pool is emptied
    (``free_all_blocks``) before the block and ``total_bytes()`` is read after
    it. A pool never gives blocks back by itself, so that is the high-water mark
    of the pool (an upper bound on live arrays: freed blocks of odd sizes may
    not be reused). For torch, ``torch.cuda.reset_peak_memory_stats`` then
    ``max_memory_allocated`` (exact live tensor bytes). Extra = peak - in use before.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 ** 2
GIB = 1024 ** 3


# -- machine description ------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def total_memory_bytes() -> int | None:
    try:
        match = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def blas_info() -> list[dict]:
    """The BLAS/OpenMP libraries loaded in this process and their thread counts (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"internal_api": "unknown (threadpoolctl not installed)", "num_threads": None}]
    return [{"user_api": info.get("user_api"), "internal_api": info.get("internal_api"),
             "num_threads": info.get("num_threads"), "version": info.get("version"),
             "library": Path(info.get("filepath", "")).name}
            for info in threadpool_info()]


def numpy_blas() -> str:
    """'openblas 0.3.27, 2 threads' for the BLAS that NumPy itself links."""
    import numpy as np
    entries = [e for e in blas_info() if e.get("user_api") == "blas"]
    numpy_dir = Path(np.__file__).parent.name  # "numpy" (libs are in numpy.libs / numpy/.dylibs)
    mine = [e for e in entries if e.get("library", "").startswith(("libscipy_openblas", "libopenblas", "libmkl"))
            or numpy_dir in e.get("library", "")] or entries
    if not mine:
        return "no BLAS found by threadpoolctl"
    e = mine[0]
    return f"{e['internal_api']} {e.get('version') or ''}".strip() + f", {e['num_threads']} threads"


def torch_description() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    info = {"version": torch.__version__, "num_threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(), "cuda": None}
    try:
        info["mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except Exception:
        pass
    if torch.cuda.is_available():
        info["cuda"] = {"name": torch.cuda.get_device_name(0), "version": torch.version.cuda}
    return info


def gpu_description() -> dict | None:
    """CuPy's view of GPU 0, or None when minicnn cannot use a GPU."""
    import minicnn
    usable, reason = minicnn.backend.gpu_status()
    if not usable:
        return {"usable": False, "reason": reason}
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    name = name.decode() if isinstance(name, bytes) else name
    return {"usable": True, "name": name, "cupy": cupy.__version__,
            "memory_bytes": int(props.get("totalGlobalMem", 0)),
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}


def machine_description(with_torch: bool = True) -> dict:
    import numpy as np
    description = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_bytes": total_memory_bytes(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "numpy": np.__version__,
        "numpy_blas": numpy_blas(),
        "blas_libraries": blas_info(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                       if k in os.environ},
        "gpu": gpu_description(),
        "torch": torch_description() if with_torch else None,
    }
    return description


def describe_markdown(machine: dict) -> str:
    """A few markdown lines for the head of a report."""
    memory = machine.get("memory_bytes")
    lines = [
        f"- date: {machine['date']}",
        f"- machine: {machine['platform']}, Python {machine['python']}",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cores']} usable)"
        + (f", {memory / GIB:.1f} GiB RAM" if memory else ""),
        f"- load average at start (1/5/15 min): {machine.get('load_average')}"
        + ("  **(machine busy: timings unreliable)**" if machine_busy(machine) else ""),
        f"- NumPy {machine['numpy']}, BLAS: {machine['numpy_blas']}",
    ]
    if machine.get("thread_env"):
        lines.append(f"- thread variables: {machine['thread_env']}")
    torch = machine.get("torch")
    if torch:
        cuda = torch.get("cuda")
        lines.append(f"- PyTorch {torch['version']}, {torch['num_threads']} intra-op threads"
                     + (f", CUDA {cuda['version']} on {cuda['name']}" if cuda else ", no CUDA"))
    else:
        lines.append("- PyTorch: not installed")
    gpu = machine.get("gpu") or {}
    if gpu.get("usable"):
        lines.append(f"- minicnn GPU: {gpu['name']} (CuPy {gpu['cupy']}, "
                     f"{gpu['memory_bytes'] / GIB:.1f} GiB)")
    else:
        lines.append(f"- minicnn GPU: none ({gpu.get('reason', 'unknown')})")
    return "\n".join(lines)


def machine_busy(machine: dict) -> bool:
    """True when the 1-minute load average says other work was running at the start."""
    load = machine.get("load_average")
    return bool(load) and load[0] > max(0.5, 0.1 * (machine.get("usable_cores") or 1))


def set_threads(threads: int | None) -> None:
    """Limit NumPy's BLAS and torch (if already imported) to ``threads``; None leaves the defaults."""
    if not threads:
        return
    import sys
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


# -- timing ------------------------------------------------------------------------------------

def _no_sync() -> None:
    pass


def time_it(fn, repeats: int = 10, warmup: int = 2, sync=None) -> dict:
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed.

    ``sync`` (e.g. ``minicnn.synchronize`` or ``torch.cuda.synchronize``) is called
    after each run, before the clock is read, so asynchronous GPU work is counted.
    Returns seconds: {"median", "min", "max", "mean", "times": [...], "repeats", "warmup"}.
    """
    if repeats < 1:
        raise ValueError(f"time_it: repeats must be >= 1, got {repeats}")
    sync = sync or _no_sync
    for _ in range(warmup):
        fn()
    sync()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    times = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
    finally:
        if was_enabled:
            gc.enable()
    return {"median": statistics.median(times), "min": min(times), "max": max(times),
            "mean": statistics.fmean(times), "times": times, "repeats": repeats, "warmup": warmup}


# -- memory ------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return None


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_free_heap() -> bool:
    """glibc's malloc_trim(0): give freed heap memory back to the OS, so that the RSS before a
    measured step holds live data only. Without it, buffers that an earlier (warm-up) step freed
    stay resident and the next step reuses them unseen: a library allocating through malloc
    (torch CPU) would look as if it needed no extra memory at all. False where unavailable."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


class HostPeakMemory:
    """``with HostPeakMemory() as m: step()`` then m.extra (bytes above the RSS before),
    m.peak (the process's peak RSS during the block) and m.method. See the module doc."""

    def __init__(self, interval: float = 0.0005):
        self.interval = interval
        self.method = "unavailable"
        self.before = self.peak = self.extra = None

    def __enter__(self):
        gc.collect()
        release_free_heap()
        self.before = current_rss()
        if self.before is None:
            return self
        if _reset_hwm() and _status_kb("VmHWM") is not None:
            self.method = "vmhwm-reset"
            self.before = current_rss()
        else:
            self.method = "sampled"
            self._peak_sampled = self.before
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            rss = current_rss()
            if rss is not None and rss > self._peak_sampled:
                self._peak_sampled = rss
            time.sleep(self.interval)

    def __exit__(self, *exc):
        if self.method == "vmhwm-reset":
            self.peak = _status_kb("VmHWM")
        elif self.method == "sampled":
            self._stop.set()
            self._thread.join()
            self.peak = max(self._peak_sampled, current_rss() or 0)
        if self.peak is not None:
            self.extra = max(0, self.peak - self.before)
        return False


class GpuPeakMemory:
    """``with GpuPeakMemory("cupy" | "torch") as m: step()``: m.extra, m.peak (bytes), m.method."""

    def __init__(self, library: str):
        self.library = library
        self.before = self.peak = self.extra = None
        self.method = {"cupy": "cupy-pool-total", "torch": "torch-max-allocated"}[library]

    def __enter__(self):
        gc.collect()
        if self.library == "cupy":
            import cupy
            cupy.cuda.get_current_stream().synchronize()
            pool = cupy.get_default_memory_pool()
            pool.free_all_blocks()
            self.before = pool.used_bytes()
        else:
            import torch
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        if self.library == "cupy":
            import cupy
            cupy.cuda.get_current_stream().synchronize()
            self.peak = cupy.get_default_memory_pool().total_bytes()
        else:
            import torch
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        self.extra = max(0, self.peak - self.before)
        return False


# -- output ------------------------------------------------------------------------------------

def usable_backends(keys) -> tuple[list[str], dict]:
    """Backend names that can run here, and {name: why not} for the others (also printed)."""
    backends, skipped = [], {}
    for key in keys:
        why = backend_unavailable(key)
        if why:
            skipped[BACKENDS[key]] = why
            print(f"skipping {BACKENDS[key]}: {why}", file=sys.stderr)
        else:
            backends.append(BACKENDS[key])
    return backends, skipped


def markdown_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column (l/r), default: text left, numbers right."""
    cells = [[format_cell(value) for value in row] for row in rows]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) and not isinstance(rows[0][i], bool)
                        else "l" for i in range(len(headers)))
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "| " + " | ".join(v.rjust(w) if a == "r" else v.ljust(w)
                                 for v, w, a in zip(values, widths, align)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else (":" + "-" * (w + 1))
                          for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def mib(size: int | None) -> float | None:
    return None if size is None else size / MIB


def write_json(path: str | os.PathLike, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value):
    try:
        import numpy as np
        if isinstance(value, np.generic):
            return value.item()
    except ImportError:
        pass
    return str(value)


def parse_list(text: str, allowed=None, kind=str) -> list:
    items = [kind(item.strip()) for item in text.split(",") if item.strip()]
    if allowed is not None:
        bad = [item for item in items if item not in allowed]
        if bad:
            raise SystemExit(f"error: unknown value(s) {bad}; choose from {sorted(allowed)}")
    return items


# -- backends ----------------------------------------------------------------------------------

# CLI key -> the name used in tables and JSON rows.
BACKENDS = {
    "numpy": "minicnn-numpy",
    "cupy": "minicnn-cupy",
    "torch": "torch-cpu",
    "torch-cl": "torch-cpu-cl",      # torch CPU with channels_last model and input (bench_train_step only)
    "torch-cuda": "torch-cuda",
}
# Which torch backend a minicnn backend is compared with ("same device").
REFERENCE = {"minicnn-numpy": "torch-cpu", "minicnn-cupy": "torch-cuda", "torch-cpu-cl": "torch-cpu"}


def backend_unavailable(key: str) -> str | None:
    """None when the backend can run here, else why not."""
    import importlib.util
    if key == "numpy":
        return None
    if key == "cupy":
        import minicnn
        usable, reason = minicnn.backend.gpu_status()
        return None if usable else reason
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if key == "torch-cuda":
        import torch
        return None if torch.cuda.is_available() else "torch.cuda.is_available() is False"
    return None


# -- the same network in torch -----------------------------------------------------------------

def _torch_module(layer):
    """An untrained torch.nn module with the same hyper-parameters as a minicnn layer."""
    import torch
    import minicnn
    nn = torch.nn
    from minicnn.models.resnet import ResNet
    if isinstance(layer, ResNet):
        from torch_resnet import torch_resnet     # benchmarks/torch_resnet.py
        blocks = tuple(len(getattr(layer, f"layer{i}")) for i in range(1, 5))
        return torch_resnet(blocks, layer.num_classes, layer.in_channels, layer.width)
    if isinstance(layer, minicnn.Sequential):
        return nn.Sequential(*[_torch_module(child) for child in layer])
    if isinstance(layer, minicnn.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                         layer.padding, bias=layer.bias is not None)
    if isinstance(layer, minicnn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    if isinstance(layer, minicnn.ReLU):
        return nn.ReLU()
    if isinstance(layer, minicnn.MaxPool2d):
        return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, minicnn.Flatten):
        return nn.Flatten()
    if isinstance(layer, minicnn.Dropout):
        return nn.Dropout(layer.p)
    if isinstance(layer, minicnn.BatchNorm2d):
        return nn.BatchNorm2d(layer.num_features, layer.eps, layer.momentum)
    if isinstance(layer, minicnn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool2d(1)
    raise TypeError(f"no torch equivalent known for {type(layer).__name__}")


def torch_layer_from(layer):
    """A torch.nn module with the same hyper-parameters and the same weights as a minicnn
    layer, Sequential or ResNet-18 (state_dict keys such as "0.weight" or "layer1.0.bn1.running_var"
    match; loaded with strict=True, BatchNorm statistics included)."""
    import numpy as np
    import torch
    import minicnn
    module = _torch_module(layer)
    state = {key: torch.from_numpy(np.ascontiguousarray(minicnn.as_numpy(value)))
             for key, value in layer.state_dict().items()}
    module.load_state_dict(state, strict=True)   # copies into torch's own storage
    module.train(layer.training)
    return module
