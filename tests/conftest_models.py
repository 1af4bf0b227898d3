"""Checkpoints for tests that need a model but no training (imported explicitly, not a conftest)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from covidct.checkpoint import save_checkpoint
from covidct.model import build_model, preset
from covidct.preprocess import Preprocess


def write_checkpoint(path, name: str = "tiny", input_size: int | None = None, seed: int = 0,
                     threshold: float = 0.5, preprocess: Preprocess | None = None, **meta) -> Path:
    """A covidct checkpoint of preset ``name`` with random weights (and, for BatchNorm, random
    running statistics, so eval mode is not the identity), as ``covidct train`` writes it;
    ``preprocess`` defaults to the whole slice at the preset's input size."""
    config = preset(name)
    if input_size is not None:
        config.input_size = input_size
    model = build_model(config, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for module in model.modules():
        if hasattr(module, "running_var"):
            module.running_mean = rng.normal(0, 0.1, module.running_mean.shape).astype(np.float32)
            module.running_var = rng.uniform(0.5, 1.5, module.running_var.shape).astype(np.float32)
            module.weight.data = rng.uniform(0.5, 1.5, module.weight.shape).astype(np.float32)
            module.bias.data = rng.normal(0, 0.1, module.bias.shape).astype(np.float32)
    preprocess = preprocess or Preprocess(size=config.input_size)
    metadata = dict(model_config=config.to_dict(), preprocess=preprocess.to_dict(),
                    normalization={"mean": 0.4, "std": 0.25}, threshold=threshold, **meta)
    return save_checkpoint(path, model, metadata)


def tiny_train_config(data, out, **overrides):
    """A TrainConfig for quick runs of the tiny preset on a phantom dataset (2 epochs, batch 8, flips)."""
    from covidct.train import TrainConfig

    values = dict(data=str(data), out=str(out), model="tiny", epochs=2, batch_size=8, progress=False,
                  augment="flip", warmup_epochs=0, cache_dir=str(out) + "-cache")
    values.update(overrides)
    return TrainConfig(**values)


def train_on_phantom(root, seed: int = 0, size: int = 32, **overrides):
    """A phantom dataset (24 slices) in root/data and a tiny run on it in root/run -> (data, summary, logs)."""
    from covidct.synthetic import write_dataset
    from covidct.train import train

    data = write_dataset(Path(root) / "data", n=24, seed=seed, size=size)
    logs = []
    summary = train(tiny_train_config(data, Path(root) / "run", **overrides), log=logs.append)
    return data, summary, logs


def load_example(name: str):
    """examples/<name>.py imported as a module, for its main() and helpers."""
    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
