"""Export a covidct checkpoint for other runtimes: ONNX (ONNX Runtime, any language) and
safetensors (PyTorch and friends).

    export_onnx(model, meta, path)         the graph built from the minicnn module tree with
                                           onnx.helper (no torch); opset ONNX_OPSET, IR ONNX_IR_VERSION
    export_safetensors(model, meta, path)  the state_dict under PyTorch's parameter names, written
                                           with NumPy alone (no dependency)

ONNX graph:  image (N, 1, S, S) float32 in [0, 1]
             -> (image - mean) / std          (the checkpoint's normalisation, inside the graph)
             -> the network                   -> logits (N, 2)
             -> Softmax(axis=1)               -> probabilities (N, 2); column 1 is P(COVID)
The model's metadata_props say how a file becomes ``image`` (``covidct.preprocess``: gray
rule, size, resize; ``covidct.ct_window`` for DICOM/NIfTI), the decision threshold and the
class names. minicnn layer -> ONNX operator:

    Conv2d -> Conv          BatchNorm2d -> BatchNormalization (eval: running statistics)
    ReLU -> Relu            MaxPool2d -> MaxPool        AdaptiveAvgPool2d(1) -> GlobalAveragePool
    Flatten -> Flatten      Linear -> Gemm (transB=1)   Dropout -> nothing (identity in eval)
    BasicBlock -> its layers, then Add of the shortcut and Relu
    Ensemble (covidct.ensemble) -> every member on its own normalisation of the image (with
               flip TTA: on the batch and its mirror image, Concat + Slice), Softmax, the
               mean probability, Log: its "logits", so the final Softmax gives that mean back;
               an ensemble with lung-texture members (covidct.texture) is refused

safetensors layout: 8 bytes little-endian u64 = n, n bytes of JSON header
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian tensor bytes, in header order.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import minicnn as mc
from minicnn.layers.residual import BasicBlock
from minicnn.models.resnet import BACKBONE, HEAD, ResNet
from minicnn.serialization import atomic_write

from . import CLASS_NAMES
from .ensemble import Ensemble, reads_texture
from .preprocess import Preprocess
from .errors import CovidCTError
from .scan import window_from_metadata

__all__ = ["ONNX_OPSET", "ONNX_IR_VERSION", "FORMATS", "export_onnx", "export_safetensors", "export_checkpoint",
           "onnx_metadata"]

ONNX_OPSET = 17               # every operator used here exists unchanged since opset 14 or earlier
ONNX_IR_VERSION = 8           # the IR version of opset 17 (ONNX 1.12); read by onnxruntime >= 1.12
FORMATS = ("onnx", "safetensors")
SAFETENSORS_DTYPES = {np.dtype("float32"): "F32", np.dtype("float64"): "F64", np.dtype("float16"): "F16",
                      np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("uint8"): "U8"}

INPUT_DESCRIPTION = ("image: float32 (N, 1, S, S), one gray CT slice per row, values in [0, 1] "
                     "(see covidct.preprocess: PNG/JPEG by the gray rule, then resized to S x S; "
                     "DICOM/NIfTI in HU through covidct.ct_window first). The graph normalises it itself. "
                     "A multi-view ensemble (metadata covidct.preprocess lungs 'none,crop') takes (N, V, S, S): "
                     "channel v is the slice under lung view v (the whole slice, its lung crop). "
                     "Outputs: logits (N, 2) and probabilities (N, 2), column 1 = P(COVID).")


def onnx_metadata(meta: dict) -> dict:
    """The covidct facts a server needs, as string key/value pairs (ONNX metadata_props, safetensors)."""
    return {
        "covidct.input": INPUT_DESCRIPTION,
        "covidct.preprocess": json.dumps(meta["preprocess"]),
        "covidct.normalization": json.dumps(meta["normalization"]),
        "covidct.ct_window": json.dumps(window_from_metadata(meta).to_dict()),
        "covidct.threshold": repr(float(meta.get("threshold", 0.5))),
        "covidct.class_names": json.dumps(list(meta.get("class_names", CLASS_NAMES))),
        "covidct.model_config": json.dumps(meta["model_config"]),
    }


# ------------------------------------------------------------------ ONNX
class _GraphBuilder:
    """Collects ONNX nodes and initializers while walking the minicnn module tree."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self.count = [], [], 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint or 'x'}:{self.count}"

    def constant(self, name: str, array) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.asarray(mc.as_numpy(array), order="C"), name))
        return name

    def node(self, op: str, inputs, hint: str, **attributes) -> str:
        out = self.name(f"{hint}/{op}" if hint else op)
        self.nodes.append(self.helper.make_node(op, list(inputs), [out], name=out, **attributes))
        return out

    def emit(self, module, x: str, prefix: str) -> str:
        """Add the ONNX nodes that compute module(x) (eval mode); -> the output's name."""
        join = (lambda name: f"{prefix}.{name}" if prefix else name)
        if isinstance(module, ResNet):
            for name in BACKBONE + HEAD:
                x = self.emit(getattr(module, name), x, join(name))
            return x
        if isinstance(module, mc.Sequential):
            for name, child in module.named_children():
                x = self.emit(child, x, join(name))
            return x
        if isinstance(module, BasicBlock):
            main = x
            for name in ("conv1", "bn1", "relu1", "conv2", "bn2"):
                main = self.emit(getattr(module, name), main, join(name))
            shortcut = x if module.downsample is None else self.emit(module.downsample, x, join("downsample"))
            return self.node("Relu", [self.node("Add", [main, shortcut], prefix)], prefix)
        if isinstance(module, mc.Conv2d):
            (ph, pw) = module.padding
            inputs = [x, self.constant(join("weight"), module.weight.data)]
            if module.bias is not None:
                inputs.append(self.constant(join("bias"), module.bias.data))
            return self.node("Conv", inputs, prefix, kernel_shape=list(module.kernel_size),
                             strides=list(module.stride), pads=[ph, pw, ph, pw], dilations=[1, 1], group=1)
        if isinstance(module, mc.BatchNorm2d):
            arrays = {"weight": module.weight.data, "bias": module.bias.data,
                      "running_mean": module.running_mean, "running_var": module.running_var}
            inputs = [x] + [self.constant(join(name), array) for name, array in arrays.items()]
            return self.node("BatchNormalization", inputs, prefix, epsilon=float(module.eps))
        if isinstance(module, mc.ReLU):
            return self.node("Relu", [x], prefix)
        if isinstance(module, mc.MaxPool2d):
            (ph, pw) = module.padding
            return self.node("MaxPool", [x], prefix, kernel_shape=list(module.kernel_size),
                             strides=list(module.stride), pads=[ph, pw, ph, pw])
        if isinstance(module, mc.AdaptiveAvgPool2d):
            return self.node("GlobalAveragePool", [x], prefix)
        if isinstance(module, mc.Flatten):
            return self.node("Flatten", [x], prefix, axis=1)
        if isinstance(module, mc.Linear):
            inputs = [x, self.constant(join("weight"), module.weight.data)]
            if module.bias is not None:
                inputs.append(self.constant(join("bias"), module.bias.data))
            return self.node("Gemm", inputs, prefix, transB=1)
        if isinstance(module, mc.Dropout):
            return x                                     # eval mode: the identity
        if isinstance(module, Ensemble):
            return self.emit_ensemble(module, x, prefix)
        raise CovidCTError(f"ONNX export: no ONNX operator known for {type(module).__name__} ({prefix or 'model'})")

    def emit_ensemble(self, ensemble, x: str, prefix: str) -> str:
        """The members' softmaxes combined as covidct.ensemble.Ensemble.forward combines them: log of
        their mean, or (combine "geometric") the log softmax of their mean log-softmax."""
        join = (lambda name: f"{prefix}.{name}" if prefix else name)
        int64 = (lambda name, values: self.constant(join(name), np.array(values, np.int64)))
        if ensemble.tta:                                 # (2N, C, H, W): the batch, then its mirror images
            mirrored = self.node("Slice", [x, int64("tta.starts", [-1]), int64("tta.ends", [-2 ** 63]),
                                           int64("tta.axes", [3]), int64("tta.steps", [-1])], join("tta"))
            x = self.node("Concat", [x, mirrored], join("tta"), axis=0)
        geometric = ensemble.combine == "geometric"
        probabilities = []                               # per member: softmax, or log softmax (geometric)
        for i, (member, (mean, std)) in enumerate(zip(ensemble.members, ensemble.normalizations)):
            name = join(f"member{i}")
            member_x = x
            if ensemble.views is not None:               # the member's channel: (N, 1, H, W)
                view = ensemble.views[i]
                member_x = self.node("Slice", [x, int64(f"member{i}.view.starts", [view]),
                                               int64(f"member{i}.view.ends", [view + 1]),
                                               int64(f"member{i}.view.axes", [1])], join(f"member{i}.view"))
            mean = self.constant(f"{name}.normalization.mean", np.array(mean, np.float32))
            std = self.constant(f"{name}.normalization.std", np.array(std, np.float32))
            normalized = self.node("Div", [self.node("Sub", [member_x, mean], name), std], name)
            probabilities.append(self.node("LogSoftmax" if geometric else "Softmax",
                                           [self.emit(member, normalized, name)], name, axis=1))
        total = self.node("Sum", probabilities, prefix) if len(probabilities) > 1 else probabilities[0]
        count = self.constant(join("members.count"), np.array(len(probabilities), np.float32))
        combined = self.node("Div", [total, count], prefix)
        if ensemble.tta:                                 # (2, N, classes) -> mean over the two flips
            shape = int64("tta.shape", [2, -1, len(CLASS_NAMES)])
            combined = self.node("ReduceMean", [self.node("Reshape", [combined, shape], prefix)],
                                 prefix, axes=[0], keepdims=0)
        if geometric:
            return self.node("LogSoftmax", [combined], prefix, axis=1)
        floor = self.constant(join("log.floor"), np.array(1e-30, np.float32))
        return self.node("Log", [self.node("Max", [combined, floor], prefix)], prefix)


def export_onnx(model: mc.Module, meta: dict, path) -> Path:
    """Write ``model`` (eval mode) with the checkpoint's normalisation as an ONNX file -> path."""
    if reads_texture(model):
        raise CovidCTError("ONNX export: this ensemble has lung-texture members (covidct.texture: a lung mask and "
                           "local binary patterns of the slice at 224 px), which no ONNX operator expresses; "
                           "export an ensemble trained without them (--model without 'texture'), or use "
                           "--format safetensors")
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise CovidCTError('ONNX export needs onnx: pip install -e ".[onnx]"') from None
    size = int(meta["preprocess"]["size"])
    views = len(Preprocess.from_dict(meta["preprocess"]).views)       # a multi-view ensemble's channels
    channels = views if views > 1 else int(meta["model_config"].get("in_channels", 1))
    builder = _GraphBuilder(helper, numpy_helper)
    mean = builder.constant("normalization.mean", np.array(meta["normalization"]["mean"], np.float32))
    std = builder.constant("normalization.std", np.array(meta["normalization"]["std"], np.float32))
    x = builder.node("Div", [builder.node("Sub", ["image", mean], "normalize"), std], "normalize")
    logits = builder.emit(model, x, "")
    builder.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))
    builder.nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], name="probabilities", axis=1))
    classes = len(CLASS_NAMES)
    graph = helper.make_graph(
        builder.nodes, "covidct",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        builder.initializers)
    onnx_model = helper.make_model(graph, producer_name="covidct", producer_version=meta.get("versions", {})
                                   .get("covidct", ""), opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                                   doc_string="COVID-19 lung-CT slice classifier (covidct on minicnn). "
                                   + INPUT_DESCRIPTION)
    onnx_model.ir_version = ONNX_IR_VERSION
    helper.set_model_props(onnx_model, onnx_metadata(meta))
    onnx.checker.check_model(onnx_model)
    return atomic_write(path, lambda file: file.write(onnx_model.SerializeToString()))


# ------------------------------------------------------------------ safetensors
def export_safetensors(model: mc.Module, meta: dict, path) -> Path:
    """Write model.state_dict() (PyTorch's names: "0.weight", "layer1.0.bn1.running_var", ...) as
    safetensors -> path. torch.nn code with the same architecture loads it with strict=True."""
    state = {name: np.asarray(mc.as_numpy(array), order="C") for name, array in model.state_dict().items()}
    header, offset = {}, 0
    for name, array in state.items():
        if array.dtype not in SAFETENSORS_DTYPES:
            raise CovidCTError(f"safetensors export: {name} has dtype {array.dtype}, not one of "
                               f"{sorted(str(d) for d in SAFETENSORS_DTYPES)}")
        header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = {"format": "pt", **onnx_metadata(meta)}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)                     # the data starts 8-byte aligned

    def write(file):
        file.write(np.uint64(len(text)).astype("<u8").tobytes())
        file.write(text)
        for array in state.values():
            file.write(array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes())

    return atomic_write(path, write)


def export_checkpoint(checkpoint, fmt: str, out) -> Path:
    """covidct export: load the checkpoint, write it as ``fmt`` (onnx or safetensors) to ``out``."""
    from .checkpoint import load_checkpoint

    if fmt not in FORMATS:
        raise CovidCTError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    model, meta = load_checkpoint(checkpoint)
    return (export_onnx if fmt == "onnx" else export_safetensors)(model, meta, out)
