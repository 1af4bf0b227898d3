"""Time loading the real COVID-CT train split (425 images, 224x224) cold and from the cache.

    python benchmarks/bench_data_cache.py [DATA_ROOT]

DATA_ROOT defaults to $COVIDCT_DATA or ../shared/covid-ct beside the repository.
The on-disk cache goes to a temporary folder that is deleted afterwards.
"""
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from covidct.data import read_dataset  # noqa: E402
from covidct.preprocess import Preprocess, clear_memory_cache, load_images  # noqa: E402


def main() -> int:
    default = os.environ.get("COVIDCT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "covid-ct"
    root = Path(sys.argv[1] if len(sys.argv) > 1 else default)
    if not root.is_dir():
        print(f"error: COVID-CT data not found at {root}; pass its folder or set COVIDCT_DATA", file=sys.stderr)
        return 2
    dataset = read_dataset(root, "train")
    pre = Preprocess(size=224)
    print(f"machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()})")
    print(f"data: {root} train split, {len(dataset)} images -> {pre}")
    with tempfile.TemporaryDirectory(prefix="covidct-cache-") as cache:
        clear_memory_cache()
        start = time.perf_counter()
        images, labels, _ = load_images(dataset, pre, cache_dir=cache)
        cold = time.perf_counter() - start

        clear_memory_cache()                      # the warm run reads the on-disk .npz cache
        start = time.perf_counter()
        again, _, _ = load_images(dataset, pre, cache_dir=cache)
        warm = time.perf_counter() - start

        start = time.perf_counter()               # and once more from the in-memory cache
        load_images(dataset, pre, cache_dir=cache)
        memory = time.perf_counter() - start
        size_mb = sum(f.stat().st_size for f in Path(cache).rglob("*.npz")) / 1e6
    assert (images == again).all()
    print(f"cold (decode + resize + write cache): {cold:6.2f} s")
    print(f"warm (on-disk cache):                 {warm:6.2f} s")
    print(f"warm (in-memory cache):               {memory:6.2f} s")
    print(f"array {images.shape} {images.dtype}, cache on disk {size_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
