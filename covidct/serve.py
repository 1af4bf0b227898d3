"""``covidct serve``: a local web page that looks inside one prediction (Flask, extra ``.[web]``).

    create_app(checkpoint)         -> a Flask app:  GET /  the page;  POST /api/predict  one slice
    analyse_upload(state, data, n) -> the JSON the page shows (also what the tests check)

The page takes one slice (PNG, JPEG or a single-slice DICOM, picked or dropped) and shows
  * P(COVID) against the checkpoint's decision threshold, and the predicted label;
  * the slice as the network sees it (after the checkpoint's preprocessing; DICOM through
    the CT window first);
  * the Grad-CAM heatmap for the COVID logit over the slice (``covidct.gradcam``);
  * the lung-field mask (``covidct.lungs``, cut and resized like the model input)
    and the share of the Grad-CAM mass inside it;
  * the first conv layer's feature maps, one tile per filter.

Safety: bound to 127.0.0.1 unless --host says otherwise; uploads above MAX_UPLOAD_BYTES are
refused (413), anything that is not PNG, JPEG or DICOM by its first bytes is refused (400);
an upload is written only into a fresh temporary folder, removed after the request; the
model is used by one request at a time (minicnn layers keep their activations).
"""
from __future__ import annotations

import base64
import io
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import minicnn as mc

from . import CLASS_NAMES
from .checkpoint import load_checkpoint
from .ensemble import Ensemble
from .errors import CovidCTError, DataError
from .preprocess import Preprocess, input_lung_mask, load_image, normalize, read_gray

MAX_UPLOAD_BYTES = 16 * 1024 * 1024
KINDS = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}


def sniff(data: bytes, filename: str = "") -> str:
    """'png', 'jpeg' or 'dicom' from the first bytes (a .dcm name allows a DICOM without preamble)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[128:132] == b"DICM" or filename.lower().endswith(".dcm"):
        return "dicom"
    raise DataError(f"{filename or 'upload'}: not a PNG, JPEG or DICOM file (by its first bytes)")


# ------------------------------------------------------------------ pictures as data URIs
def png_data_uri(rgb_or_gray: np.ndarray) -> str:
    """float array in [0, 1], (H, W) or (H, W, 3) -> 'data:image/png;base64,...'."""
    array = np.clip(np.asarray(rgb_or_gray, np.float64) * 255 + 0.5, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def heat_overlay(gray: np.ndarray, heat: np.ndarray, strength: float = 0.5) -> np.ndarray:
    """(H, W) slice and (H, W) heat in [0, 1] -> (H, W, 3): the 'jet' colours blended in where hot."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heat)[..., :3]
    alpha = strength * heat[..., None]
    return (1 - alpha) * gray[..., None] + alpha * colours


def mask_overlay(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) slice with the mask tinted green -> (H, W, 3)."""
    rgb = np.repeat(gray[..., None], 3, axis=2)
    rgb[mask] = 0.55 * rgb[mask] + 0.45 * np.array([0.1, 0.9, 0.3])
    return rgb


def tile_maps(maps: np.ndarray, gap: int = 1) -> np.ndarray:
    """(F, h, w) -> one gray grid image, ceil(sqrt(F)) tiles per row, each map scaled to [0, 1]."""
    count, h, w = maps.shape
    columns = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    grid = np.ones((rows * (h + gap) - gap, columns * (w + gap) - gap))
    for k, fmap in enumerate(maps):
        low, high = float(fmap.min()), float(fmap.max())
        r, c = divmod(k, columns)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = \
            (fmap - low) / (high - low) if high > low else 0.0
    return grid


def first_conv(model, x):
    """(the first Conv2d, its input for the normalised batch x, its description) for the page;
    an ensemble shows its first member's, on that member's own normalisation."""
    label = ""
    if isinstance(model, Ensemble):
        model, x, label = model.members[0], model.member_input(x, 0), f" (member 1 of {len(model.members)})"
    conv = next(module for module in model.modules() if isinstance(module, mc.Conv2d))
    return conv, x, describe_conv(conv) + label


def describe_conv(conv: mc.Conv2d) -> str:
    """'Conv2d 1->16, 5x5, stride 2' for the page."""
    (kh, kw), (sy, sx) = conv.kernel_size, conv.stride
    stride = f"{sy}" if sy == sx else f"{sy}x{sx}"
    return f"Conv2d {conv.in_channels}->{conv.out_channels}, {kh}x{kw}, stride {stride}"


# ------------------------------------------------------------------ one prediction
@dataclass
class ServedModel:
    """A loaded checkpoint and what the page needs from its metadata; ``lock``: one request at a time."""
    model: mc.Module
    meta: dict
    device: str = "cpu"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.preprocess = Preprocess.from_dict(self.meta["preprocess"])
        self.threshold = float(self.meta.get("threshold", 0.5))
        self.mean, self.std = self.meta["normalization"]["mean"], self.meta["normalization"]["std"]


def decode_upload(served: ServedModel, data: bytes, filename: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Upload bytes -> (the model input (1, size, size) in [0, 1], the whole gray slice (h, w), kind),
    through a private temporary folder."""
    from .scan import read_dicom_bytes, slice_input, window_from_metadata

    kind = sniff(data, filename)
    name = Path(filename or "upload").name or "upload"
    if kind == "dicom":
        gray = window_from_metadata(served.meta).apply(read_dicom_bytes(data, name))
        return slice_input(gray, served.preprocess), gray, kind
    with tempfile.TemporaryDirectory(prefix="covidct-serve-") as folder:
        path = Path(folder) / ("upload" + KINDS[kind])           # never the client's file name as a path
        path.write_bytes(data)
        try:
            return load_image(path, served.preprocess), read_gray(path), kind
        except DataError as error:
            raise DataError(str(error).replace(str(path), name)) from None


def analyse_upload(served: ServedModel, data: bytes, filename: str = "upload") -> dict:
    """The page's JSON for one uploaded slice: P(COVID), label, threshold and four pictures."""
    from .gradcam import frame_boxes_of, gradcam, mass_inside
    from .texture import texture_inputs

    image, whole_slice, kind = decode_upload(served, data, filename)
    x = mc.to_device(normalize(image[None], served.mean, served.std), served.device)
    with served.lock:
        heatmap, logits = gradcam(served.model, x, target_class=1, return_logits=True,
                                  features=texture_inputs(served.model, grays=[whole_slice]),
                                  boxes=frame_boxes_of(served.model, served.preprocess, [whole_slice]))
        conv, conv_input, layer = first_conv(served.model, x)
        maps = mc.as_numpy(conv(conv_input))[0]                         # (F, h, w)
        served.model.release_saved()
    shifted = np.exp(logits[0] - logits[0].max())
    p_covid = float(shifted[1] / shifted.sum())
    gray = image[0]
    mask = input_lung_mask(whole_slice, served.preprocess)                # cut and resized like the input
    mask = np.zeros(gray.shape, bool) if mask is None else mask
    inside = mass_inside(heatmap[0], mask) if mask.any() else float("nan")
    return {
        "file": Path(filename or "upload").name, "kind": kind,
        "p_covid": p_covid, "threshold": served.threshold,
        "label": CLASS_NAMES[int(p_covid >= served.threshold)],
        "lung_fraction": float(mask.mean()),
        "gradcam_in_lungs": None if not np.isfinite(inside) else float(inside),
        "feature_maps": {"count": int(maps.shape[0]), "layer": layer},
        "images": {
            "slice": png_data_uri(gray),
            "gradcam": png_data_uri(heat_overlay(gray, heatmap[0])),
            "lungs": png_data_uri(mask_overlay(gray, mask)),
            "features": png_data_uri(tile_maps(maps)),
        },
    }


# ------------------------------------------------------------------ the app
def create_app(checkpoint, device: str = "cpu"):
    """The Flask app serving one checkpoint."""
    try:
        from flask import Flask, jsonify, request
    except ImportError:
        raise CovidCTError('the web page needs Flask: pip install -e ".[web]"') from None
    model, meta = load_checkpoint(checkpoint, device)
    served = ServedModel(model, meta, device)
    app = Flask("covidct")
    app.config["MAX_CONTENT_LENGTH"] = MAX_UPLOAD_BYTES
    page = PAGE.replace("{{THRESHOLD}}", f"{served.threshold:.4g}").replace(
        "{{CHECKPOINT}}", _html_escape(Path(checkpoint).name)).replace("{{MAX_MB}}", str(MAX_UPLOAD_BYTES >> 20))

    @app.get("/")
    def index():
        return page, 200, {"Content-Type": "text/html; charset=utf-8"}

    @app.post("/api/predict")
    def predict():
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            return jsonify(error="no file: send one slice as the form field 'file'"), 400
        data = upload.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            return jsonify(error=f"{upload.filename}: larger than {MAX_UPLOAD_BYTES >> 20} MB"), 413
        try:
            return jsonify(analyse_upload(served, data, upload.filename))
        except CovidCTError as error:
            return jsonify(error=str(error)), 400

    @app.errorhandler(413)
    def too_large(_error):
        return jsonify(error=f"upload larger than {MAX_UPLOAD_BYTES >> 20} MB"), 413

    return app


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def serve(checkpoint, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu") -> int:
    """Run the page with Flask's own server until Ctrl-C."""
    import socket

    app = create_app(checkpoint, device)
    try:                                  # a clear one-line error now, rather than Werkzeug's exit later
        with socket.create_server((host, port)):
            pass
    except (OSError, OverflowError) as error:
        raise CovidCTError(f"--host {host} --port {port}: cannot listen there "
                           f"({getattr(error, 'strerror', None) or error}); choose another --port") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: other machines can reach this page (no authentication)")
    print(f"covidct: serving {checkpoint} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    app.run(host=host, port=port, threaded=True, debug=False, use_reloader=False)
    return 0


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>covidct: look inside a prediction</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 980px; color: #222; }
  h1 { font-size: 1.3rem; margin-bottom: .2rem; }
  .muted { color: #666; font-size: .9rem; }
  #drop { border: 2px dashed #999; border-radius: 8px; padding: 1.2rem; text-align: center; margin: 1rem 0; }
  #drop.over { background: #eef6ff; border-color: #3a7bd5; }
  #error { color: #b00020; white-space: pre-wrap; }
  #result { display: none; }
  .score { font-size: 2rem; font-weight: 600; }
  .COVID { color: #b00020; } .non-COVID { color: #1b7a3a; }
  .grid { display: grid; grid-template-columns: repeat(4, 1fr); gap: .8rem; margin-top: 1rem; }
  figure { margin: 0; } figcaption { font-size: .85rem; color: #444; margin-top: .3rem; }
  figure img { width: 100%; image-rendering: pixelated; border: 1px solid #ccc; background: #000; }
</style>
</head>
<body>
<h1>covidct: look inside a prediction</h1>
<div class="muted">Model <code>{{CHECKPOINT}}</code>. A research tool on a small public data set, not a diagnosis.</div>
<div id="drop">
  Drop a CT slice here (PNG, JPEG or a single-slice DICOM, at most {{MAX_MB}} MB), or
  <input id="file" type="file" accept=".png,.jpg,.jpeg,.dcm,image/png,image/jpeg,application/dicom">
</div>
<div id="status" class="muted"></div>
<div id="error"></div>
<div id="result">
  <div><span id="file-name"></span>: P(COVID) = <span id="p-covid" class="score"></span>
    &rarr; <b id="label"></b> <span class="muted">(COVID when P(COVID) &ge; <span id="threshold">{{THRESHOLD}}</span>)</span></div>
  <div class="grid">
    <figure><img id="img-slice" alt="the slice as the network sees it"><figcaption>The slice as the network sees it</figcaption></figure>
    <figure><img id="img-gradcam" alt="Grad-CAM overlay"><figcaption>Grad-CAM for the COVID logit: where the evidence is</figcaption></figure>
    <figure><img id="img-lungs" alt="lung mask"><figcaption id="lungs-caption">Lung fields (classical mask)</figcaption></figure>
    <figure><img id="img-features" alt="first conv layer feature maps"><figcaption id="features-caption">First conv layer's feature maps</figcaption></figure>
  </div>
</div>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const show = (id, text) => { document.getElementById(id).textContent = text; };
async function send(file) {
  show("error", ""); show("status", "analysing " + file.name + " ...");
  const form = new FormData(); form.append("file", file);
  let reply;
  try {
    const response = await fetch("/api/predict", { method: "POST", body: form });
    reply = await response.json();
  } catch (err) { reply = { error: "the server did not answer (" + err + ")" }; }
  show("status", "");
  if (reply.error) { show("error", reply.error); document.getElementById("result").style.display = "none"; return; }
  show("file-name", reply.file); show("p-covid", reply.p_covid.toFixed(4)); show("threshold", reply.threshold);
  const label = document.getElementById("label"); label.textContent = reply.label; label.className = reply.label;
  for (const key of ["slice", "gradcam", "lungs", "features"]) document.getElementById("img-" + key).src = reply.images[key];
  const inside = reply.gradcam_in_lungs === null ? "no lung fields found" :
    (100 * reply.gradcam_in_lungs).toFixed(1) + " % of the Grad-CAM mass inside";
  show("lungs-caption", "Lung fields (classical mask): " + (100 * reply.lung_fraction).toFixed(1) + " % of the slice; " + inside);
  show("features-caption", reply.feature_maps.count + " feature maps of the first conv layer, " + reply.feature_maps.layer);
  document.getElementById("result").style.display = "block";
}
input.addEventListener("change", () => { if (input.files.length) send(input.files[0]); });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) send(e.dataTransfer.files[0]); });
</script>
</body>
</html>
"""
