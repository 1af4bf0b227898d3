"""Training: epochs of mini-batch gradient descent, validation, checkpoints, resume.

A run directory holds everything a run produces:

    config.json      the TrainConfig used
    last.npz         resumable checkpoint of the last completed epoch (weights, optimizer, RNG)
    best.npz         the last epoch (default: the cross-validated recipe), or the best by --select
    history.csv      per-epoch train/val loss, accuracy, AUC, sensitivity, specificity, lr
    curves.png       training curves
    metrics.json, predictions.csv, roc.png, confusion.png   best model on the validation split

With ``--members M`` the run directory holds member0/ ... member<M-1>/ (each a run as above,
seeds ``member_seed(seed, i)``), ensemble.npz (the members as one checkpoint, threshold chosen
on val) and the ensemble's metrics.json, predictions.csv, roc.png, confusion.png. Several views
(--lungs, --intensity) or presets (--model), as in the default recipe, add to the member names:
member0-none-window-default/, member0-crop-deep-small/, ... (``ensemble_members``). A ``texture``
entry of --model (the default's) fits the lung-texture model (covidct.texture) on the same
training slices and saves it in ensemble.npz as one more member (``fit_texture_members``; one per
``texture`` entry, ``texture:none-equalize`` reading the equalised slice).

``--resume RUN_DIR`` continues from last.npz; Ctrl-C or ``kill -9`` lose at most
the epoch in progress. A NaN/inf loss stops the run with a clear message and
leaves the last good checkpoint in place. The epoch loop itself (checkpoints,
resume, history, early stopping) is ``covidct.loop.EpochLoop``.

Data comes in memory (``TrainData``), so folds, ensembles and other callers can
train on arrays they already hold:

    Trainer(config).fit()                                   # loads config.data's splits
    Trainer(config, data=TrainData(x_train, y_train, x_val, y_val)).fit()
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

import minicnn as mc
from minicnn.models.resnet import IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD, gray_filters

from .augment import parse_augment
from .checkpoint import TASK_COVID, check_finite, save_checkpoint
from .data import read_dataset
from .errors import CovidCTError
from .evaluate import choose_threshold, predict_checkpoint, predict_proba, report_text, write_evaluation
from .attention import parse_strengths, strength_for
from .frozen import strategy_for
from .loader import DataLoader
from .loop import EpochLoop, learning_rate, run_ended, write_run_config  # noqa: F401  (learning_rate: public here too)
from .metrics import classification_metrics
from .model import PRESETS, ModelConfig, ResNetConfig, build_model, count_parameters, preset, split_backbone_head
from .options import option
from .paths import writable_dir
from .runlock import RunLock
from .preprocess import (RESIZE_MODES, Preprocess, compute_normalization, load_images, view_modes,
                         view_name, view_pairs, views_error)
from .scan import CTWindow
from .workers import check_jobs

SELECT_METRICS = ("auc", "accuracy", "balanced_accuracy", "loss", "last")
OPTIMIZERS, SCHEDULES, DEVICES = ("sgd", "adam", "adamw"), ("none", "step", "cosine"), ("cpu", "gpu")
SAMPLING_MODES = ("shuffle", "sources")
TEXTURE = "texture"                  # the --model entry of the lung-texture member (covidct.texture)


@dataclass
class TrainConfig:
    data: str = option("", "dataset: UCSD COVID-CT root, CSV manifest or class folders "
                           "(default: the generated synthetic phantom dataset)")
    out: str = option("runs/covidct", "run directory (default: runs/<model>-<data name>)")
    model: str = option("default,deep-small:none-equalize,texture,texture:none-equalize",
                        "model preset: default, wide, seed (the 2020 CNNv3), deep, deep-small, resnet18, "
                        "resnet-small, tiny; several joined by commas train one model of each (per view) and save "
                        "them as one ensemble; PRESET:VIEW trains that preset on that view only; 'texture' joins "
                        "a logistic regression on the lungs' texture at 224 px to the ensemble (covidct.texture), "
                        "'texture:none-equalize' another on the histogram-equalised slice (the default, chosen by "
                        "cross-validation: default on every --lungs view, deep-small on the equalised whole slice, "
                        "and the two texture models)",
                        metavar="PRESET[:VIEW][,...][,texture[:none-INTENSITY]]")
    image_size: int | None = option(None, "input size (default: the preset's)")
    epochs: int = option(40, "number of epochs (with --resume: a larger number extends the run)")
    batch_size: int = option(32, "images per batch")
    optimizer: str = option("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = option(1e-3, "learning rate")
    momentum: float = option(0.9, "SGD momentum (Nesterov); SGD only")
    weight_decay: float = option(1e-4, "weight decay")
    schedule: str = option("cosine", "learning-rate schedule after the warm-up", choices=SCHEDULES)
    warmup_epochs: int = option(2, "epochs of linear learning-rate warm-up")
    step_epochs: int = option(15, "step schedule: lr *= 0.1 every this many epochs")
    class_weights: str = option("balanced", "loss weight per class: balanced, none, or 'w0,w1'")
    sampling: str = option("sources", "sources: draw slices with replacement so that every source (paper, case: "
                                      "covidct.sources) of a class weighs alike (the cross-validated best); "
                                      "shuffle: every training slice once per epoch", choices=SAMPLING_MODES)
    augment: str = option("flip", "e.g. 'flip,rotate:15,translate:0.1,blur:1.0' or the report's codes '1,2,3,5'; "
                                  "'none'. The default, mirror images only, was chosen by cross-validation")
    seed: int = option(0, "random seed (weights, order, augmentation)")
    device: str = option("cpu", "where to train", choices=DEVICES)
    select: str = option("last", "which epoch best.npz keeps: last (the epochs are the recipe's, chosen by covidct "
                                 "cv, so the 118 validation images only report), or the best by this validation "
                                 "metric", choices=SELECT_METRICS)
    patience: int = option(15, "early stopping with --select auc/accuracy/...: epochs without improvement")
    target_sensitivity: float | None = option(None, "choose the decision threshold on val to reach this COVID "
                                                    "sensitivity (e.g. 0.9)")
    train_split: str = option("train", "split to learn from")
    val_split: str = option("val", "split for model selection")
    cache_dir: str | None = option(None, "decoded-image cache (default: $COVIDCT_CACHE/images)")
    skip_bad: bool = option(False, "skip unreadable images (listed per split in the run directory)")
    progress: bool = option(True, "no per-batch progress bar")
    pretrained: str | None = option(None, "start from these weights: torchvision's resnet18-f37072fd.pth (read "
                                          "without torch), a minicnn .npz or a covidct checkpoint; tensors that "
                                          "do not fit stay fresh", metavar="PATH")
    freeze_backbone: bool = option(False, "train only the head (ResNet-18: fc; other models: the FC block); the "
                                          "backbone runs forward only, and with --augment none its features are "
                                          "computed once")
    unfreeze_after: int = option(0, "with --freeze-backbone: train the whole network from epoch N+1 (0: never)",
                                 metavar="N")
    backbone_lr_scale: float = option(1.0, "the backbone learns at lr * S (e.g. 0.1 for gentle fine-tuning)",
                                      metavar="S")
    lung_attention: str = option("default:none-window=0.3,deep-small:none-equalize=3",
                                 "train CNNs to keep their last feature map inside the lungs: a penalty of this "
                                 "strength on its share of activation outside the lung mask (covidct/attention.py); "
                                 "one number for every CNN, or PRESET[:VIEW]=S entries (the default, chosen by "
                                 "cross-validation: the two whole-slice CNNs); 0: none",
                                 metavar="S|PRESET[:VIEW]=S[,...]")
    lungs: str = option("none-window,crop", "how a model sees each slice: none (whole), crop (cut to its lung fields "
                                     "before resizing, covidct/lungs.py), mask (crop, and blank what lies outside "
                                     "the lung mask); each may name its own --intensity (none-window: the whole "
                                     "slice, window-calibrated); several joined by commas train one model per "
                                     "view, saved as one ensemble (the default: the window-calibrated whole "
                                     "slice and the lung crop, chosen by cross-validation); --model entries with "
                                     "a view of their own keep it",
                        metavar="{none,crop,mask}[-INTENSITY][,...]")
    resize: str = option("stretch", "stretch: fill the square (the cross-validated best); pad: keep the aspect "
                                    "ratio on a black square", choices=RESIZE_MODES)
    intensity: str = option("none", "equalize: histogram-equalise every slice, so that figures with other "
                                    "windows and contrasts look alike; window: calibrate every slice's gray scale on "
                                    "its lungs and soft tissue (covidct.preprocess.window_calibrate); stored in the "
                                    "checkpoint. Several (none,equalize): one model per view, as with --lungs",
                            metavar="{none,equalize,window}[,...]")
    extra_data: tuple = option((), "another dataset whose images (all of them) are added to TRAINING only, never "
                                   "to validation or CV test folds; repeatable (e.g. ../shared/sars-cov-2-ct)",
                               metavar="PATH")
    extra_mode: str = option("mix", "mix: train on --data and the extra data at once; pretrain: first "
                                    "--extra-epochs on the extra data alone, then fine-tune on --data",
                             choices=("mix", "pretrain"))
    extra_epochs: int = option(6, "epochs on the extra data with --extra-mode pretrain")
    members: int = option(1, "train this many models per view that differ only in their seed and save them as "
                             "one ensemble (ensemble.npz: the mean of their log-odds); in covidct cv, per fold",
                          metavar="M")
    tta: bool = option(True, "score each slice alone; by default ensembles (several members, views or presets; "
                             "covidct cv's held-out predictions and fold ensemble) also score its left-right "
                             "mirror image and join the two (test-time augmentation)")

    # options added after runs were saved without them, and what those runs did (--resume keeps it)
    ADDED_LATER = {"lung_attention": "0"}

    def __post_init__(self):
        self.extra_data = tuple(self.extra_data or ())

    @property
    def views(self) -> tuple[tuple[str, str], ...]:
        """(lungs, intensity) of every view, one input channel each: --lungs x --intensity, lungs-major
        (Preprocess.views), then the views that --model entries name for themselves."""
        everywhere = any(view is None for _, view in self.model_views)        # some preset takes every view
        views = list(view_pairs(self.lungs, self.intensity)) if everywhere else []
        for _, own_view in self.model_views:
            if own_view and own_view not in views:
                views.append(own_view)
        return tuple(views)

    @property
    def model_views(self) -> tuple[tuple[str, tuple[str, str] | None], ...]:
        """(preset, its own view) of every --model entry: "deep-small:none-equalize" -> ("deep-small",
        ("none", "equalize")), trained on that view only; "default" -> ("default", None), on every
        view of --lungs x --intensity."""
        entries = [entry.partition(":") for entry in self.model.split(",")]
        return tuple((name, view_pairs(view, "none")[0] if view else None) for name, _, view in entries
                     if name != TEXTURE)

    @property
    def cnn_views(self) -> tuple[tuple[str, tuple[str, str]], ...]:
        """(preset, view) of every CNN the recipe trains (per seed), in ensemble_members' order."""
        lung_views = view_pairs(self.lungs, self.intensity)
        return tuple((model, view) for view in self.views for model, own_view in self.model_views
                     if own_view == view or own_view is None and view in lung_views)

    @property
    def attention_strength(self) -> float:
        """--lung-attention for this config's one CNN (a member's config; covidct.attention.strength_for)."""
        return strength_for(self.lung_attention, self.models[0], self.views[0]) if self.model_views else 0.0

    @property
    def texture_intensities(self) -> tuple[str, ...]:
        """The gray scale of every texture model of --model (covidct.texture), in order: "texture" ->
        "window" (the window-calibrated whole slice), "texture:none-equalize" -> "equalize"."""
        entries = [entry.partition(":") for entry in self.model.split(",")]
        return tuple(view_pairs(view, "none")[0][1] if view else "window" for name, _, view in entries
                     if name == TEXTURE)

    @property
    def texture(self) -> bool:
        """Does --model join a lung-texture model (covidct.texture) to the ensemble?"""
        return bool(self.texture_intensities)

    @property
    def models(self) -> tuple[str, ...]:
        """The distinct model presets of --model."""
        return tuple(dict.fromkeys(name for name, _ in self.model_views))

    @property
    def is_ensemble(self) -> bool:
        """Does this recipe train several models (--members, several views or presets)?"""
        return self.members > 1 or len(self.views) > 1 or len(self.model_views) > 1 or self.texture

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be sgd, adam or adamw, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"--schedule must be none, step or cosine, got {self.schedule!r}"),
            (self.step_epochs >= 1, f"--step-epochs must be >= 1, got {self.step_epochs}"),
            (self.members >= 1, f"--members must be >= 1, got {self.members}"),
            (self.sampling in SAMPLING_MODES, f"--sampling must be shuffle or sources, got {self.sampling!r}"),
            (self.select in SELECT_METRICS, f"--select must be one of {SELECT_METRICS}, got {self.select!r}"),
            (self.device in DEVICES, f"--device must be cpu or gpu, got {self.device!r}"),
            (self.target_sensitivity is None or 0 < self.target_sensitivity <= 1,
             f"--target-sensitivity must be in (0, 1], got {self.target_sensitivity}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CovidCTError(message)
        if self.unfreeze_after < 0 or (self.unfreeze_after and not self.freeze_backbone):
            raise CovidCTError(f"--unfreeze-after {self.unfreeze_after}: expected a number of epochs >= 1, "
                               f"used together with --freeze-backbone")
        if not self.backbone_lr_scale > 0:
            raise CovidCTError(f"--backbone-lr-scale must be > 0, got {self.backbone_lr_scale}")
        error = views_error(self.lungs, self.intensity)
        if error:
            raise CovidCTError(f"--{error}")
        entries, unknown = self.model.split(","), []
        for entry in entries:
            name, _, view = entry.partition(":")
            if name == TEXTURE:                 # the whole slice (lungs "none"), one gray scale of its own
                own = view_pairs(view, "none") if view and not views_error(view, "none") else ()
                if view and (len(own) != 1 or own[0][0] != "none"):
                    unknown.append(entry)
            elif name not in PRESETS or view and views_error(view, "none"):
                unknown.append(entry)
        if unknown or len(set(entries)) < len(entries):
            raise CovidCTError(f"--model must be one of {', '.join(PRESETS)}, each optionally with a view of its "
                               f"own (deep-small:none-equalize), or several different ones joined by commas "
                               f"(default,deep-small), and optionally 'texture' (the window-calibrated slice) "
                               f"or 'texture:none-equalize' / 'texture:none' (its gray scale), got {self.model!r}")
        intensities = self.texture_intensities
        if len(set(intensities)) < len(intensities):
            raise CovidCTError(f"--model {self.model}: two texture models on the same gray scale "
                               f"({', '.join(intensities)})")
        if not self.model_views:
            raise CovidCTError(f"--model {self.model}: the texture model joins an ensemble of CNNs; name a CNN "
                               f"preset too (--model default,texture)")
        entries = [entry for entry in entries if entry.partition(":")[0] != TEXTURE]
        if len(entries) == 1 and ":" in entries[0]:
            raise CovidCTError(f"--model {self.model}: a view of its own is for one preset among several; for one "
                               f"model give its view with --lungs and --intensity")
        lung_views = view_pairs(self.lungs, self.intensity)
        twice = [f"{name}:{view_name(*view)}" for name, view in self.model_views
                 if view in lung_views and (name, None) in self.model_views]
        if twice:
            raise CovidCTError(f"--model {self.model} --lungs {self.lungs}: {', '.join(twice)} is already trained "
                               f"on every --lungs view")
        sizes = {PRESETS[name].input_size for name in self.models}
        if len(sizes) > 1 and not self.image_size:
            raise CovidCTError(f"--model {self.model}: the presets take different input sizes "
                               f"({', '.join(map(str, sorted(sizes)))} px); give one with --image-size")
        parse_strengths(self.lung_attention)
        attending = [(name, view) for name, view in self.cnn_views if strength_for(self.lung_attention, name, view)]
        resnets = sorted({name for name, _ in attending if isinstance(PRESETS[name], ResNetConfig)})
        if resnets:
            raise CovidCTError(f"--lung-attention {self.lung_attention}: the penalty works on the Sequential presets "
                               f"(default, wide, deep, deep-small, tiny), not on {', '.join(resnets)}")
        if attending and self.freeze_backbone:
            raise CovidCTError(f"--lung-attention {self.lung_attention} trains the conv layers; it does not go with "
                               f"--freeze-backbone (give --lung-attention 0)")
        if len(self.models) > 1 and (self.pretrained or self.extra_data and self.extra_mode == "pretrain"):
            raise CovidCTError(f"--model {self.model}: starting weights (--pretrained, --extra-mode pretrain) fit "
                               f"one model; use one preset")
        if len(self.views) > 1 and self.extra_data and self.extra_mode == "pretrain":
            raise CovidCTError(f"--lungs {self.lungs} --intensity {self.intensity} with --extra-mode pretrain: "
                               f"pretraining is done for one view; use one mode of each, or --extra-mode mix")
        if self.resize not in RESIZE_MODES:
            raise CovidCTError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.extra_mode == "pretrain" and self.extra_data and self.pretrained \
                and self.pretrained != extra_checkpoint(self):
            raise CovidCTError("--extra-mode pretrain makes its own starting weights; leave out --pretrained")
        if self.extra_mode not in ("mix", "pretrain") or self.extra_epochs < 1:
            raise CovidCTError(f"--extra-mode must be mix or pretrain and --extra-epochs >= 1, "
                               f"got {self.extra_mode!r} and {self.extra_epochs}")
        for extra in self.extra_data:
            if not Path(extra).exists():
                raise CovidCTError(f"--extra-data {extra}: no such file or directory")
        if self.pretrained and not Path(self.pretrained).is_file():
            raise CovidCTError(f"--pretrained {self.pretrained}: no such file")
        if self.device == "gpu" and not mc.gpu_available():
            raise CovidCTError(f"--device gpu: {mc.backend.gpu_status()[1]}")


def class_weights(spec: str, labels: np.ndarray) -> list[float] | None:
    """'balanced' -> N / (2 * n_k) per class; 'none' -> None; 'w0,w1' -> as given."""
    if spec == "none":
        return None
    if spec == "balanced":
        counts = np.bincount(labels, minlength=2)
        if counts.min() == 0:
            raise CovidCTError(f"the training split has an empty class (counts {counts.tolist()})")
        return [len(labels) / (2.0 * c) for c in counts]
    try:
        weights = [float(w) for w in spec.split(",")]
    except ValueError:
        weights = []
    if len(weights) != 2 or min(weights) <= 0:
        raise CovidCTError(f"--class-weights must be 'balanced', 'none' or two positive numbers 'w0,w1', got {spec!r}")
    return weights


def make_optimizer(config: TrainConfig, params):
    if config.optimizer == "sgd":
        return mc.optim.SGD(params, config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
                            weight_decay=config.weight_decay)
    optimizer_cls = mc.optim.Adam if config.optimizer == "adam" else mc.optim.AdamW
    return optimizer_cls(params, config.lr, weight_decay=config.weight_decay)


def model_config_for(config: TrainConfig) -> ModelConfig:
    """The model config of config's (first) preset, at --image-size: the input every preset of an
    ensemble recipe shares (validate checks)."""
    model_config = preset(config.models[0])
    if config.image_size:
        model_config.input_size = config.image_size
    model_config.feature_shape()  # fails early, with a sentence, if the size is too small
    return model_config


def preprocess_for(config: TrainConfig, model_config) -> Preprocess:
    """The preprocessing a run's images get (and its checkpoints store)."""
    lungs, intensity = view_modes(config.views, config.lungs, config.intensity)
    return Preprocess(size=model_config.input_size, resize=config.resize, lungs=lungs, intensity=intensity)


def load_split(config, split: str | None, preprocess: Preprocess, skipped_dir=None, source=None, log=print):
    """-> images (N, 1, H, W) float32 in [0, 1], labels (N,), paths. split None: every image of source
    (default: config.data).

    With config.skip_bad, the skipped files of this split are listed in skipped_dir/skipped-<split>.txt
    (the run directory: each run keeps the lists of all its splits).
    """
    source = source or config.data
    dataset = read_dataset(source, split=split, check_files=not config.skip_bad)
    name = split or Path(source).name
    skipped_log = Path(skipped_dir) / f"skipped-{name}.txt" if skipped_dir is not None else None
    stats = {}
    loaded = load_images(dataset, preprocess, cache_dir=config.cache_dir, skip_bad=config.skip_bad,
                         progress=config.progress, skipped_log=skipped_log, stats=stats)
    if stats.get("lung_fallbacks"):
        log(f"{source} {split or ''}: no plausible lung mask in {stats['lung_fallbacks']} of {stats['images']} "
            f"slices; those keep the whole slice")
    return loaded


def load_extra(config: TrainConfig, preprocess: Preprocess, log=print, skipped_dir=None):
    """All images of every --extra-data set, concatenated (training only) -> images, labels, paths."""
    parts = [load_split(config, None, preprocess, skipped_dir, source, log) for source in config.extra_data]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [path for p in parts for path in p[2]])


def pretrain_on_extra(config: TrainConfig, extra, log=print) -> str:
    """extra_mode "pretrain": train config's model on the extra images alone for extra_epochs
    (every 10th image only watches) -> the checkpoint to fine-tune from (config.out/pretrain-extra)."""
    from dataclasses import replace

    images, labels, paths = extra
    watch = np.arange(len(images)) % 10 == 0
    pre_config = replace(config, out=str(Path(config.out) / "pretrain-extra"), epochs=config.extra_epochs,
                         select="last", extra_data=(), pretrained=None, target_sensitivity=None,
                         warmup_epochs=min(config.warmup_epochs, config.extra_epochs - 1))
    log(f"pretraining on {len(images)} extra slices for {config.extra_epochs} epochs in {pre_config.out}")
    data = TrainData(images[~watch], labels[~watch], images[watch], labels[watch],
                     [p for p, w in zip(paths, watch) if not w], [p for p, w in zip(paths, watch) if w])
    Trainer(pre_config, data=data, log=lambda *_: None).fit()
    return extra_checkpoint(config)


def extra_checkpoint(config: TrainConfig) -> str:
    return str(Path(config.out) / "pretrain-extra" / "best.npz")



@dataclass
class TrainData:
    """The images a Trainer learns from (train) and reports on (val; with --select, picks the epoch), in memory.

    train_images, val_images: float32 (N, 1, H, W) in [0, 1], H = W = the model's input size
                              ((N, views, H, W) for several lung views: ``view(i)`` is one of them)
    train_labels, val_labels: int (N,), 1 = COVID
    train_paths, val_paths:   where each image came from (for predictions.csv), or None
    """
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    train_paths: list | None = None
    val_paths: list | None = None

    def __post_init__(self):
        self.train_labels = np.asarray(self.train_labels, dtype=np.int64)
        self.val_labels = np.asarray(self.val_labels, dtype=np.int64)
        for name in ("train", "val"):
            images, labels = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
                raise CovidCTError(f"TrainData: {name} images must be (N, C, H, W) with N = len(labels) > 0, "
                                   f"got images {images.shape} and {len(labels)} labels")
            if getattr(self, f"{name}_paths") is None:
                setattr(self, f"{name}_paths", [f"{name}[{i}]" for i in range(len(images))])

    def view(self, index: int) -> "TrainData":
        """The same slices, only channel ``index`` (one view) of the images; itself when they have one."""
        if self.train_images.shape[1] == 1 and index == 0:
            return self

        def channel(images):
            return np.ascontiguousarray(images[:, index:index + 1])
        return TrainData(channel(self.train_images), self.train_labels, channel(self.val_images), self.val_labels,
                         self.train_paths, self.val_paths)

    @classmethod
    def from_config(cls, config: TrainConfig, preprocess: Preprocess, skipped_dir=None, log=print) -> "TrainData":
        """The config's train and val splits, decoded with ``preprocess`` (cached, see load_images).

        --extra-data: mix adds every extra image to train (never to val); pretrain first trains a
        starting point on the extra images alone and sets config.pretrained to it.
        """
        train_images, train_labels, train_paths = load_split(config, config.train_split, preprocess, skipped_dir,
                                                             log=log)
        if config.extra_data and config.extra_mode == "pretrain":
            if config.pretrained != extra_checkpoint(config):      # not yet done (a resumed run has it)
                extra = load_extra(config, preprocess, log, skipped_dir)
                config.pretrained = pretrain_on_extra(config, extra, log)
        elif config.extra_data:
            extra_images, extra_labels, extra_paths = load_extra(config, preprocess, log, skipped_dir)
            train_images = np.concatenate([train_images, extra_images])
            train_labels = np.concatenate([train_labels, extra_labels])
            train_paths = train_paths + extra_paths
        val = load_split(config, config.val_split, preprocess, skipped_dir, log=log)
        return cls(train_images, train_labels, val[0], val[1], train_paths, val[2])


def load_pretrained_weights(model, path, log=print) -> int:
    """Copy every tensor of ``path`` whose name and shape fit ``model``; returns how many.

    A 3-channel conv1 (ImageNet) is summed over RGB to fit a 1-channel model; tensors that
    do not fit (the 1000-way ImageNet fc) keep their fresh initialisation.
    """
    import pickle
    import zipfile

    from minicnn.torch_load import load_state_dict_file

    try:
        state = load_state_dict_file(path)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CovidCTError(f"--pretrained {path}: cannot read weights ({error})") from None
    if any(key.startswith("model.") for key in state):  # a covidct checkpoint
        state = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    own = model.state_dict()
    fitting = {}
    for key, value in state.items():
        if key == "conv1.weight" and value.ndim == 4 and value.shape[1] == 3 and own.get(key) is not None \
                and own[key].shape[1] == 1:
            value = gray_filters(value)                             # RGB filters -> one gray filter
        if key in own and tuple(value.shape) == tuple(own[key].shape):
            fitting[key] = value
    if not fitting:
        raise CovidCTError(f"--pretrained {path}: no tensor matches the model's names and shapes")
    check_finite(fitting, f"--pretrained {path}")
    model.load_state_dict(fitting, strict=False)
    # BatchNorm's num_batches_tracked is a counter, not a weight (torchvision's older files lack it)
    fresh = [key for key in own if key not in fitting and not key.endswith("num_batches_tracked")]
    log(f"loaded {len(fitting)} pretrained tensors from {path}; freshly initialised: {fresh or 'none'}")
    return len(fitting)


class Trainer(EpochLoop):
    """One classifier run: data, model, optimizer and run directory, trained by the shared epoch loop.

    data: a TrainData, or None to read config.data's train/val splits (``TrainData.from_config``).
    """
    command, task, config_key = "train", TASK_COVID, "train_config"
    cache_features = True        # frozen backbone without augmentation: compute its features once

    def __init__(self, config: TrainConfig, data: TrainData | None = None, log=print, comm=None):
        config.validate()
        # data-parallel ranks (covidct train --distributed; docs/distributed.md): rank 0 alone logs and writes
        self.comm = comm or self.comm
        if not self.is_root:
            log, config.progress = (lambda *args, **kwargs: None), False
        if config.batch_size % self.comm.size:
            raise CovidCTError(f"--batch-size {config.batch_size} (the global batch) must be a multiple of "
                               f"the number of ranks, {self.comm.size}")
        if len(config.views) > 1 or len(config.model_views) > 1:
            raise CovidCTError(f"--lungs {config.lungs} --intensity {config.intensity} --model {config.model}: a "
                               f"Trainer trains one model on one view; covidct.train.train trains one per view "
                               f"and preset")
        self.config, self.log = config, log
        self.run_dir = Path(config.out)
        self.model_config = model_config_for(config)
        self.preprocess = preprocess_for(config, self.model_config)
        if data is None:
            check_outputs(config)
            data = TrainData.from_config(config, self.preprocess, skipped_dir=self.run_dir, log=log)
        size = self.preprocess.size
        if data.train_images.shape[2:] != (size, size) or data.val_images.shape[2:] != (size, size):
            raise CovidCTError(f"TrainData: images of {data.train_images.shape[2:]} and {data.val_images.shape[2:]}"
                               f" pixels, but model '{config.model}' takes {size}x{size}")
        channels = self.model_config.in_channels
        if data.train_images.shape[1] != channels or data.val_images.shape[1] != channels:
            raise CovidCTError(f"TrainData: images of {data.train_images.shape[1]} and {data.val_images.shape[1]} "
                               f"channels, but model '{config.model}' takes {channels}")
        self.data = data
        self.mean, self.std = compute_normalization(data.train_images)  # training split only

        self.model = build_model(self.model_config, seed=config.seed)
        if config.pretrained:
            load_pretrained_weights(self.model, config.pretrained, log)
            if Path(config.pretrained).suffix in (".pth", ".pt"):  # ImageNet weights: ImageNet's statistics
                self.mean, self.std = IMAGENET_GRAY_MEAN, IMAGENET_GRAY_STD
        self.model.to(config.device)
        self.backbone, self.head = split_backbone_head(self.model)
        self.optimizer = make_optimizer(config, [
            {"params": self.backbone.parameters(), "lr_scale": config.backbone_lr_scale},
            {"params": self.head.parameters()}])
        if self.comm.size > 1:                                   # average gradients over the ranks
            self.optimizer = mc.distributed.DataParallelOptimizer(self.optimizer, self.comm)
        self.criterion = mc.SoftmaxCrossEntropy(class_weights(config.class_weights, data.train_labels))
        self.augment = parse_augment(config.augment)
        self.loader = DataLoader(data.train_images, data.train_labels, config.batch_size // self.comm.size,
                                 shuffle=True, shard=(self.comm.rank, self.comm.size),
                                 drop_last=len(data.train_images) > config.batch_size, seed=config.seed,
                                 augment=self.augment, device=config.device, normalize=(self.mean, self.std),
                                 weights=sampling_weights(config, data))
        self.strategy = None         # covidct.frozen: which part learns, and on what
        self.init_loop()

    # -- the task, for the loop -------------------------------------------------------------
    def metadata(self, epoch: int, threshold: float = 0.5, metrics=None) -> dict:
        return {"model_config": self.model_config.to_dict(), "preprocess": self.preprocess.to_dict(),
                "normalization": {"mean": self.mean, "std": self.std}, "threshold": threshold,
                "ct_window": CTWindow().to_dict(),  # how DICOM/NIfTI scans become gray slices (covidct.scan)
                "augment": str(self.augment), "metrics": metrics or {}}

    def batches(self, epoch: int):
        self.strategy = strategy_for(self, epoch, self.strategy)
        return self.strategy.batches(epoch)

    def forward(self, x, epoch: int):
        return self.strategy.forward(x)

    def train_epoch(self, epoch: int) -> dict:
        row = super().train_epoch(epoch)
        outside_share = getattr(self.strategy, "outside_share", None)      # --lung-attention only
        share = outside_share() if outside_share else None
        if share is not None:
            row["train_outside_lungs"] = share
        return row

    def backward(self, grad_logits, epoch: int) -> None:
        self.strategy.backward(grad_logits)

    def evaluate(self, epoch: int) -> dict:
        scores = strategy_for(self, epoch, self.strategy).val_scores()
        labels = self.data.val_labels
        metrics = classification_metrics(labels, scores, 0.5)
        p_true = np.clip(np.where(labels == 1, scores, 1 - scores), 1e-7, 1.0)
        return {"val_loss": float(-np.mean(np.log(p_true))), "val_accuracy": metrics["accuracy"],
                "val_auc": metrics["auc"], "val_sensitivity": metrics["sensitivity"],
                "val_specificity": metrics["specificity"], "val_balanced_accuracy": metrics["balanced_accuracy"]}

    def selection_key(self, row: dict) -> list[float]:
        """Larger is better; ties on the metric are broken by the lower validation loss.
        "last" keeps every new epoch (the validation data then only watches)."""
        if self.config.select == "last":
            return [row["epoch"], 0.0]
        value = -row["val_loss"] if self.config.select == "loss" else row[f"val_{self.config.select}"]
        value = -np.inf if value is None or not np.isfinite(value) else value
        return [value, -row["val_loss"]]

    @property
    def kept(self) -> str:
        """Which epoch best.npz holds: the "last", or the "best" by --select."""
        return "last" if self.config.select == "last" else "best"

    def describe(self) -> str:
        return (f"{len(self.data.train_images)} training / {len(self.data.val_images)} validation images at "
                f"{self.preprocess.size}x{self.preprocess.size}; model '{self.config.model}' with "
                f"{count_parameters(self.model):,} parameters; device {self.config.device}"
                + (f"; lung attention {self.config.attention_strength:g}" if self.config.attention_strength else ""))

    def epoch_line(self, row: dict, improved: bool) -> str:
        return (f"epoch {row['epoch']:3d}/{self.config.epochs}  loss {row['train_loss']:.4f}  "
                f"acc {row['train_accuracy']:.3f} | val loss {row['val_loss']:.4f}  "
                f"acc {row['val_accuracy']:.3f}  AUC {_fmt(row['val_auc'])}  "
                f"sens {_fmt(row['val_sensitivity'])}  spec {_fmt(row['val_specificity'])}  "
                + (f"outside lungs {row['train_outside_lungs']:.2f}  " if "train_outside_lungs" in row else "")
                + f"({row['seconds']:.1f}s){'  *' if improved and self.config.select != 'last' else ''}")

    def finish(self) -> dict:
        """Reload the kept epoch (best.npz), choose its threshold on val, write the evaluation files."""
        from .checkpoint import load_checkpoint

        best_path, data = self.run_dir / "best.npz", self.data
        model, meta = load_checkpoint(best_path, self.config.device)
        scores = predict_proba(model, data.val_images, self.mean, self.std, device=self.config.device)
        threshold = choose_threshold(data.val_labels, scores, self.config.target_sensitivity)
        metrics = write_evaluation(self.run_dir, data.val_labels, scores, data.val_paths, threshold,
                                   title=f"validation, {self.kept} epoch {meta['epoch'] + 1}")
        meta.update(threshold=threshold, metrics={"val": metrics["threshold"]})
        save_checkpoint(best_path, model, meta)
        self.log(report_text(data.val_labels, scores, threshold,
                             f"validation split, {self.kept} epoch {meta['epoch'] + 1}"))
        return {"best_epoch": meta["epoch"] + 1, "kept": self.kept, "threshold": threshold,
                "val": metrics["threshold"], "val_at_0.5": metrics["threshold_0.5"], "run_dir": str(self.run_dir),
                "checkpoint": str(best_path)}

    def write_history(self) -> None:
        import pandas as pd

        from .plots import plot_history

        super().write_history()
        frame = pd.DataFrame(self.history)
        plot_history(frame[[c for c in frame.columns if c not in ("lr", "seconds")]], self.run_dir / "curves.png")


def train(config: TrainConfig, resume: bool = False, log=print, data: TrainData | None = None, comm=None,
          jobs: int = 1) -> dict:
    """Train (or resume) a run; returns the kept epoch's validation summary (on rank 0 of ``comm``).
    With config.members > 1, several views (--lungs, --intensity) or presets (--model): an ensemble
    (``train_members``).

    The run directory is locked first (by rank 0 of a distributed run), so a second writer is refused
    before any work. jobs: an ensemble's members trained at once in that many worker processes
    (``train_members``; the results are a serial run's).
    """
    config.validate()                                   # a bad option leaves no run directory behind
    check_jobs(jobs, config.device)
    if jobs > 1 and comm is not None:
        raise CovidCTError(f"--jobs {jobs} and --distributed: a distributed run trains each member on all ranks "
                           f"in turn; use one of the two")
    if config.is_ensemble:
        return train_members(config, resume, log, data, comm, jobs)
    with RunLock(config.out, log) if comm is None or comm.rank == 0 else contextlib.nullcontext():
        trainer = Trainer(config, data=data, log=log, comm=comm)
        if resume:
            trainer.resume()
        return trainer.fit()


def check_outputs(config: TrainConfig) -> None:
    """CovidCTError naming the flag unless --out (and --cache-dir) can be written: before any decoding."""
    writable_dir(config.out, "--out")
    if config.cache_dir:
        writable_dir(config.cache_dir, "--cache-dir")


def sampling_weights(config: TrainConfig, data: TrainData):
    """The training loader's weights for --sampling sources (None: visit every slice once per epoch;
    also when every source has one slice, where the weights would all be equal)."""
    if config.sampling == "shuffle":
        return None
    from .sources import source_weights

    weights = source_weights(data.train_paths, data.train_labels)
    return None if np.allclose(weights, weights[0]) else weights


def member_seed(seed: int, member: int) -> int:
    """The seed of ensemble member ``member`` (0 keeps ``seed``: member 0 is the single-model run)."""
    return seed + 100_000 * member


def ensemble_members(config: TrainConfig) -> list[tuple[int, TrainConfig, str, int]]:
    """The single-model runs of an ensemble recipe, one per view, preset (--model) and seed (--members),
    view-major; a plain preset sees every view of --lungs x --intensity, a PRESET:VIEW entry its own
    view only: [(view index, the member's config (one --lungs, --intensity and --model, --members 1),
    run-name suffix ("" for one view and preset, else "-crop", "-none-equalize", "-crop-deep-small", ...),
    seed number)]. Callers set out and seed."""
    multiview, multimodel = len(config.views) > 1, len(config.models) > 1

    def suffix(lungs, intensity, model):
        names = ([view_name(lungs, intensity)] if multiview else []) + ([model] if multimodel else [])
        return "".join(f"-{name}" for name in names)

    return [(config.views.index(view), replace(config, lungs=view[0], intensity=view[1], model=model, members=1),
             suffix(*view, model), member)
            for model, view in config.cnn_views for member in range(config.members)]


def train_members(config: TrainConfig, resume: bool = False, log=print, data: TrainData | None = None,
                  comm=None, jobs: int = 1) -> dict:
    """An ensemble: config.members runs that differ only in their seed, for every view (--lungs x
    --intensity) and preset (--model), in RUN/member<i>[-<view>][-<preset>]/ (``ensemble_members``),
    joined into RUN/ensemble.npz (the mean of their log-odds, covidct.ensemble) with its threshold
    chosen on val like a single run's. The data is decoded once for all members. On resume, finished
    members are kept and a stopped one continues from its last.npz. With jobs > 1 the members train
    in that many worker processes, slowest first, and the texture features are computed beside them
    (``train_at_once``). With ``comm`` (--distributed) every member is trained data-parallel by all
    ranks in turn, and rank 0 writes the ensemble."""
    from .ensemble import combine_probabilities, save_ensemble

    out = Path(config.out)
    root = comm is None or comm.rank == 0
    if not root:                                        # rank 0 alone logs and writes
        log = (lambda *args, **kwargs: None)
    with RunLock(out, log) if root else contextlib.nullcontext():
        if root:
            write_run_config(out, config)
        if data is None:
            check_outputs(config)
            data = TrainData.from_config(config, preprocess_for(config, model_config_for(config)), skipped_dir=out,
                                         log=log)
        plan = ensemble_members(config)
        view_data = [data.view(index) for index in range(len(config.views))]
        members = [(replace(view_config, out=str(out / f"member{member}{suffix}"), seed=member_seed(config.seed, member)),
                    view_data[view_index]) for view_index, view_config, suffix, member in plan]
        features = None                                 # texture features, when computed beside the members
        if jobs > 1 and comm is None:
            checkpoints, features = train_at_once(config, members, data, jobs, resume, log)
        else:
            checkpoints = []
            for number, (member_config, member_data) in enumerate(members):
                log(f"member {number + 1}/{len(members)}: {member_text(member_config)}")
                checkpoints.append(fit_member(member_config, member_data, resume, log, comm))
        if not root:
            return {"run_dir": str(out)}
        val_scores = [predict_checkpoint(path, member_data.val_images, config.device, tta=config.tta)
                      for path, (_, member_data) in zip(checkpoints, members)]
        textures = []
        if config.texture:
            textures, texture_scores = fit_texture_members(data.train_paths, data.train_labels, data.val_paths,
                                                           config.texture_intensities, seed=config.seed, log=log,
                                                           features=features)
            val_scores = val_scores + texture_scores
        scores = combine_probabilities(val_scores)
        threshold = choose_threshold(data.val_labels, scores, config.target_sensitivity)
        title = f"validation, ensemble of {len(val_scores)} models"
        metrics = write_evaluation(out, data.val_labels, scores, data.val_paths, threshold, title=title)
        ensemble = save_ensemble(out / "ensemble.npz", checkpoints, threshold, tta=config.tta,
                                 info={"val": metrics["threshold"]}, textures=textures)
        log(report_text(data.val_labels, scores, threshold, f"validation split, ensemble of {len(val_scores)} models"))
        return {"members": len(val_scores), "threshold": threshold, "val": metrics["threshold"],
                "val_at_0.5": metrics["threshold_0.5"], "run_dir": str(out), "checkpoint": str(ensemble)}


def member_text(config: TrainConfig) -> str:
    return f"--model {config.model} --lungs {config.lungs} --intensity {config.intensity}, seed {config.seed}, {config.out}"


def fit_member(config: TrainConfig, data: TrainData, resume: bool = False, log=print, comm=None) -> str:
    """Train one member's run (resume: keep it when it had finished, else continue from its last.npz)
    -> its best.npz."""
    trainer = Trainer(config, data=data, log=log, comm=comm)
    if resume and finished(trainer):
        log(f"{trainer.run_dir.name} had finished: kept")
    else:
        if resume and (trainer.run_dir / "last.npz").is_file():
            trainer.resume()
        trainer.fit()
    return str(trainer.run_dir / "best.npz")


def fit_member_in_worker(config: TrainConfig, data: TrainData, resume: bool, threads: int, echo: bool) -> str:
    """fit_member in a worker process on ``threads`` BLAS threads; its lines go to the run's log.txt
    and, with echo, to stdout too, each after the run's name."""
    from .workers import limit_threads

    limit_threads(threads)
    config = replace(config, progress=False)            # several bars at once would garble the terminal
    lines, name = [], Path(config.out).name

    def log(line):
        lines.append(line)
        if echo:
            print(f"[{name}] {line}", flush=True)
    try:
        return fit_member(config, data, resume, log)
    finally:
        Path(config.out).mkdir(parents=True, exist_ok=True)
        with open(Path(config.out) / "log.txt", "a" if resume else "w") as log_file:
            log_file.write("".join(f"{line}\n" for line in lines))


def train_at_once(config: TrainConfig, members, data: TrainData, jobs: int, resume: bool, log=print):
    """The members [(config, data)] trained in ``jobs`` worker processes, the slowest first, with the texture
    features (when the recipe has texture models) computed in a worker beside them -> (best.npz of each
    member in order, (train features, val features) or None)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from .texture import texture_features
    from .workers import training_cost, worker_threads

    jobs = min(jobs, len(members) + config.texture)     # no idle workers
    started, threads = time.perf_counter(), worker_threads(jobs)
    checkpoints = [None] * len(members)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        feature_futures = []
        if config.texture:
            check_texture_files(list(data.train_paths) + list(data.val_paths))
            log(f"lung-texture features of {len(data.train_paths)} + {len(data.val_paths)} slices "
                f"({', '.join(config.texture_intensities)}), beside the members")
            feature_futures = [pool.submit(texture_features, list(paths), config.texture_intensities)
                               for paths in (data.train_paths, data.val_paths)]
        order = sorted(range(len(members)), reverse=True,
                       key=lambda number: training_cost(members[number][0], len(members[number][1].train_images)))
        log(f"{len(members)} members in {jobs} worker processes, the slowest first; each one's log is its "
            f"run's log.txt")
        echo = log is print                             # on the command line the workers print their epochs
        futures = {pool.submit(fit_member_in_worker, *members[number], resume, threads, echo): number
                   for number in order}
        try:
            for future in as_completed(futures):
                number = futures[future]
                checkpoints[number] = future.result()
                log(f"member {number + 1}/{len(members)} trained: {member_text(members[number][0])} "
                    f"({time.perf_counter() - started:.0f}s so far)")
            features = tuple(future.result() for future in feature_futures) or None
        except BaseException:                           # a member failed or Ctrl-C: start no more of them
            pool.shutdown(cancel_futures=True)
            raise
    return checkpoints, features


def fit_texture_members(train_paths, train_labels, test_paths, intensities=("window",), seed: int = 0, log=print,
                        features=None):
    """The lung-texture members of an ensemble (covidct.texture), one per gray scale of ``intensities``,
    fitted on the training slices' files (each one's L2 strength by an inner CV grouped by source) ->
    ([TextureMember], [its P(COVID) on test_paths]). Deterministic; about 0.07 s a slice for the features
    of one gray scale. features: (train features, test features) when they were computed already
    (``train_at_once`` computes them beside the CNNs), else None."""
    from .sources import slice_groups
    from .texture import fit_textures, gray_scale_features, texture_features

    if features is None:
        check_texture_files(list(train_paths) + list(test_paths))
        log(f"texture models ({', '.join(intensities)}): lung-texture features of {len(train_paths)} + "
            f"{len(test_paths)} slices ...")
        features = texture_features(train_paths, intensities), texture_features(test_paths, intensities)
    train, test = features
    textures = fit_textures(train, train_labels, slice_groups(train_paths, train_labels), intensities, seed=seed)
    return textures, [texture.p_covid(gray_scale_features(test, index)) for index, texture in enumerate(textures)]


def check_texture_files(paths) -> None:
    """CovidCTError unless every path is a file: the texture models read each slice's file."""
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise CovidCTError(f"the texture model reads each slice's file; {missing[0]} is not one (use --model "
                           f"without 'texture' for images given in memory)")


def finished(trainer: Trainer) -> bool:
    """Has this member's run ended (``covidct.loop.run_ended``) with its evaluation written?"""
    from .checkpoint import read_checkpoint

    last = trainer.run_dir / "last.npz"
    if not (last.is_file() and (trainer.run_dir / "metrics.json").is_file()):
        return False
    return run_ended(read_checkpoint(last)[2], trainer.config) is not None


def _fmt(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"
