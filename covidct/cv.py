"""k-fold cross-validation over train + val, with folds grouped by source.

    grouped_folds(labels, groups, k, seed)    -> fold number of every slice
    cross_validate(config, folds=5, ...)      -> out-of-fold predictions, metrics, fold ensemble
    join_runs([run_dir, run_dir, ...])        -> the metrics of finished runs' models joined, offline

Why grouped: COVID-CT's slices were cut out of papers, often several from one
paper (one patient, one scanner, one figure style). If slices of one source sat on
both sides of a split, a model could recognise the source instead of the disease.
The official test split keeps sources apart, so the folds do too (the file-name rules
and their limits: ``covidct.sources``). Groups never mix classes, so folds are
stratified by assigning the largest groups first to the fold that has the fewest
slices of that class.

The protocol of one run: every fold trains on the other k-1 folds (+ any
``--extra-data``, training only) for a fixed number of epochs and keeps the LAST
epoch (the held-out fold never picks an epoch or a threshold); its predictions on
the held-out fold are out-of-fold (OOF) predictions. With --repeats R the folds are
drawn R times (different seeds) and the metrics pool all R x N predictions
(``summarize``: R measurements of the recipe, not the mean of a slice's R predictions,
which would score an ensemble of R fold draws). With config.tta (the default;
--no-tta) each model scores the slice and its mirror image, joined like ensemble members. With --members M,
several --lungs views V or several --model presets P (recipe options, as in covidct train;
the default: three CNNs and two texture models, covidct.train.ensemble_members) every fold trains M x V x P models
(seeds: weights, order, augmentation; views: whole slice, lung crop; presets: default,
deep-small; a PRESET:VIEW entry adds one model on its own view; a ``texture`` entry adds the
lung-texture logistic regression, ``texture:none-equalize`` another on the equalised slice, fitted per
fold on the same training slices:
``fit_fold_textures``), and the fold's held-out probability is their combination as the
ensemble makes it (the
normalised geometric mean, covidct.ensemble): the OOF figures then measure the
ensemble the way it would be used. The decision threshold is chosen once on all OOF
predictions (Youden's J, or the smallest threshold reaching --target-sensitivity) and
reported per fold as mean +/- sd. The k x M x V x P fold models of the first repeat are
saved as one ensemble checkpoint that evaluate and predict take like any other.

Choosing members without retraining: runs of one fold draw (the same data, --seed, --folds
and --repeats) hold out the same slices, so their OOF predictions can be joined the way an
ensemble of their models would join them (``join_runs``, ``covidct cv-join RUN RUN ...``; RUN:MODEL
for one model of a run of several): that is how the default recipe's members were chosen.

A stopped run continues with ``resume=True`` (``covidct cv --resume RUN``): the plan
(config, folds, repeats) is read back from RUN/config.json, a fold model whose
held-out predictions were written (``r<R>-fold<F>[-m<M>][-<view>]/heldout.csv``) is not trained
again, and a fold stopped mid-way continues from its last.npz, bit-identical to an
uninterrupted run.
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .errors import CovidCTError
from .metrics import bootstrap_ci, classification_metrics, roc_auc, roc_curve, threshold_for_sensitivity
from .sources import slice_groups, source_group  # noqa: F401  (source_group: public here too)
from .texture import texture_features
from .workers import check_jobs, limit_threads, training_cost, worker_threads

__all__ = ["source_group", "grouped_folds", "youden_threshold", "cross_validate", "format_cv_table"]


# ------------------------------------------------------------------ folds
def grouped_folds(labels, groups, k: int, seed: int = 0) -> np.ndarray:
    """Fold number (0..k-1) per slice: whole groups per fold, class counts balanced across folds.

    Groups are taken largest first (ties in a seeded random order) and each goes to the fold
    with the fewest slices of its class so far (then the fewest slices overall).
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    if k < 2 or k > len(names):
        raise CovidCTError(f"--folds {k}: expected 2 to {len(names)} (the number of sources)")
    group_class = np.array([np.bincount(labels[inverse == g]).argmax() for g in range(len(names))])
    tiebreak = np.random.default_rng(seed).permutation(len(names))
    order = np.lexsort((tiebreak, -sizes))
    per_class = np.zeros((k, int(labels.max()) + 1), np.int64)
    fold_of_group = np.empty(len(names), np.int64)
    for g in order:
        c = group_class[g]
        fold = min(range(k), key=lambda f: (per_class[f, c], per_class[f].sum(), f))
        fold_of_group[g] = fold
        per_class[fold, c] += sizes[g]
    return fold_of_group[inverse]


# ------------------------------------------------------------------ thresholds
def youden_threshold(labels, scores) -> float:
    """The threshold that maximises sensitivity + specificity - 1 on these predictions."""
    fpr, tpr, thresholds = roc_curve(labels, scores)
    best = int(np.argmax(np.asarray(tpr) - np.asarray(fpr)))
    return float(min(1.0, thresholds[best]))


def choose_oof_threshold(labels, scores, target_sensitivity: float | None) -> tuple[float, str]:
    if target_sensitivity is None:
        return youden_threshold(labels, scores), "Youden's J on the out-of-fold predictions"
    return (float(threshold_for_sensitivity(labels, scores, target_sensitivity)),
            f"sensitivity >= {target_sensitivity:g} on the out-of-fold predictions")


# ------------------------------------------------------------------ one fold
def _train_fold(config, data, test_images, blas_threads: int | None, tta: bool = False, resume: bool = False):
    """Train one fold (in this process or a worker) -> (P(COVID) on the held-out fold, best.npz path).
    tta: the held-out probability combines the slice's and its left-right mirror image's.
    resume: continue the fold's run from its last.npz if one was saved."""
    from minicnn import fast

    from .evaluate import predict_checkpoint
    from .train import Trainer

    if blas_threads:                                     # a worker shares the cores with the others
        limit_threads(blas_threads)

    lines = []
    run_dir = Path(config.out)
    trainer = Trainer(config, data=data, log=lines.append)
    if resume and (run_dir / "last.npz").is_file():
        if completed_epochs(run_dir) < config.epochs:
            trainer.resume()
            trainer.fit()
        # else: training had finished; only the held-out predictions are missing
    else:
        trainer.fit()
    with fast.one_blas_thread():                         # as in a worker, whose BLAS has one thread
        scores = predict_checkpoint(run_dir / "best.npz", test_images, config.device, tta=tta)
    mode = "a" if resume else "w"
    with open(run_dir / "log.txt", mode) as log_file:
        log_file.write("".join(f"{line}\n" for line in lines))
    return scores, str(run_dir / "best.npz")


def completed_epochs(run_dir: Path) -> int:
    """How many epochs the run in run_dir has completed (from its last.npz; 0 without one)."""
    from .checkpoint import read_checkpoint

    last = Path(run_dir) / "last.npz"
    return read_checkpoint(last)[2]["epoch"] + 1 if last.is_file() else 0


def write_heldout(run_dir: Path, paths, scores) -> None:
    """The fold's held-out predictions, written atomically: what a resumed run reuses."""
    import pandas as pd

    partial = Path(run_dir) / "heldout.csv.partial"
    pd.DataFrame({"file": list(paths), "p_covid": scores}).to_csv(partial, index=False)
    os.replace(partial, Path(run_dir) / "heldout.csv")


def read_heldout(run_dir: Path, paths):
    """The saved held-out predictions of a fold (None when it has not finished); a CovidCTError when
    they are for other files than ``paths``."""
    import pandas as pd

    saved = Path(run_dir) / "heldout.csv"
    if not saved.is_file():
        return None
    frame = pd.read_csv(saved)
    if list(frame.get("file", [])) != [str(p) for p in paths]:
        raise CovidCTError(f"{saved}: held-out predictions for other files than this fold's; the data changed "
                           f"since the run started, so start it again in a new --out folder")
    return frame["p_covid"].to_numpy(dtype=np.float64)


def save_plan(out: Path, config, folds: int, repeats: int) -> None:
    """RUN/config.json: the config as given, and how the folds are made (what --resume reads)."""
    plan = dict(asdict(config), cv={"folds": folds, "repeats": repeats})
    partial = out / "config.json.partial"
    partial.write_text(json.dumps(plan, indent=2) + "\n")
    os.replace(partial, out / "config.json")


def load_plan(out: Path) -> tuple[dict, int]:
    """({folds, repeats}, epochs per fold) saved by a cross-validation run in out."""
    try:
        saved = json.loads((Path(out) / "config.json").read_text())
        return dict(saved["cv"]), saved["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CovidCTError(f"--resume {out}: not a covidct cv run folder (no config.json with a 'cv' "
                           f"entry)") from None


# ------------------------------------------------------------------ the whole run
def cross_validate(config, folds: int = 5, repeats: int = 1, jobs: int = 1, resume: bool = False,
                   log=print) -> dict:
    """k-fold CV of one TrainConfig over its train + val splits (protocol in the module docstring).

    Writes to config.out: config.json, oof.csv, cv.json, cv.md, fold runs r<R>-fold<F>[-m<M>][-<view>][-<model>]/,
    ensemble.npz. config.members (seeds) x config.views x config.models (presets): models per fold; a fold's held-out
    probability is their combination (covidct.ensemble.combine_probabilities), each model's probability
    combined with its probability on the mirror image when config.tta (as the saved fold ensemble predicts).
    resume: continue a stopped run in config.out (same config, folds and repeats).
    Returns the cv.json dict.
    """
    from .ensemble import combine_probabilities, save_ensemble
    from .train import (TrainData, ensemble_members, extra_checkpoint, load_extra, load_split, member_seed,
                        model_config_for, preprocess_for, pretrain_on_extra)

    if repeats < 1:
        raise CovidCTError(f"--repeats must be >= 1, got {repeats}")
    check_jobs(jobs, config.device)
    target = config.target_sensitivity                  # for the OOF threshold, not for the fold runs
    config = replace(config, select="last", target_sensitivity=None, progress=False)
    config.validate()
    members, tta = config.members, config.tta
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_plan(out, replace(config, target_sensitivity=target), folds, repeats)
    preprocess = preprocess_for(config, model_config_for(config))
    parts = [load_split(config, split, preprocess, log=log) for split in (config.train_split, config.val_split)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    paths = [path for p in parts for path in p[2]]
    extra = load_extra(config, preprocess, log) if config.extra_data else None
    if extra is not None and config.extra_mode == "pretrain":   # one start for every fold
        if resume and completed_epochs(Path(extra_checkpoint(config)).parent) >= config.extra_epochs:
            start = extra_checkpoint(config)
        else:
            start = pretrain_on_extra(config, extra, log)
        config = replace(config, pretrained=start, extra_data=())
        extra = None
    plan = ensemble_members(config)                     # (view index, view config, name suffix, seed number)
    groups = slice_groups(paths, labels)
    log(f"cross-validation: {len(images)} slices from {len(set(groups))} sources "
        f"({int(labels.sum())} COVID), {folds} folds x {repeats} repeats{recipe_text(config)}"
        + (f", + {len(extra[0])} extra training slices" if extra else ""))

    tasks = []
    fold_table = np.empty((repeats, len(images)), np.int64)
    for repeat in range(repeats):
        fold_table[repeat] = grouped_folds(labels, groups, folds, seed=config.seed + repeat)
        for fold in range(folds):
            train, test = fold_table[repeat] != fold, fold_table[repeat] == fold
            train_images, train_labels = images[train], labels[train]
            train_paths = [p for p, keep in zip(paths, train) if keep]
            if extra is not None:
                train_images = np.concatenate([train_images, extra[0]])
                train_labels = np.concatenate([train_labels, extra[1]])
                train_paths = train_paths + list(extra[2])
            test_paths = [p for p, keep in zip(paths, test) if keep]
            data = TrainData(train_images, train_labels, images[test], labels[test], train_paths, test_paths)
            view_data = [data.view(index) for index in range(len(config.views))]   # cut once per fold
            for number, (view_index, view_config, suffix, member) in enumerate(plan):  # 0: single-model names, seeds
                name = f"r{repeat}-fold{fold}" + (f"-m{member}" if member else "") + suffix
                seed = member_seed(config.seed + 1000 * repeat + fold, member)
                tasks.append((repeat, fold, number, replace(view_config, out=str(out / name), seed=seed),
                              view_data[view_index], view_data[view_index].val_images))

    started = time.perf_counter()
    oof = np.full((repeats, len(images)), np.nan)
    done = {}                            # (repeat, fold, model number) -> held-out scores (saved by a stopped run)
    if resume:
        for repeat, fold, number, fold_config, data, _ in tasks:
            scores = read_heldout(fold_config.out, data.val_paths)
            if scores is not None:
                done[repeat, fold, number] = scores
        log(f"resuming {out}: {len(done)} of {len(tasks)} {'folds' if len(plan) == 1 else 'fold models'} done")
    todo = [task for task in tasks if task[:3] not in done]
    texture_futures = []
    if jobs == 1 or not todo:
        results = ((task, _train_fold(*task[3:], None, tta, resume)) for task in todo)
    else:
        # J workers; the texture features (a minute of one core) and then the slowest fold models
        # start first, so that no worker sits idle while the last big model trains alone
        blas_threads = worker_threads(jobs)
        pool = ProcessPoolExecutor(max_workers=jobs)
        if config.texture:
            log(f"lung-texture features of {len(paths) + (len(extra[2]) if extra else 0)} slices "
                f"({', '.join(config.texture_intensities)}), beside the fold models")
            texture_futures = [pool.submit(texture_features, list(p), config.texture_intensities)
                               for p in (paths, extra[2] if extra is not None else [])]
        futures = {pool.submit(_train_fold, *task[3:], blas_threads, tta, resume): task
                   for task in sorted(todo, key=lambda task: training_cost(task[3], len(task[4].train_images)),
                                      reverse=True)}
        results = ((futures[future], future.result()) for future in as_completed(futures))
    for (repeat, fold, number, fold_config, data, _), (scores, _) in results:
        write_heldout(fold_config.out, data.val_paths, scores)
        done[repeat, fold, number] = scores
        fold_auc = roc_auc(labels[fold_table[repeat] == fold], scores)
        _, _, suffix, member = plan[number]
        model_note = ((f" seed {member + 1}/{members}" if members > 1 else "")
                      + (f" model {suffix[1:]}" if suffix else ""))
        log(f"repeat {repeat + 1}/{repeats} fold {fold + 1}/{folds}{model_note}: held-out AUC {fold_auc:.3f} "
            f"({time.perf_counter() - started:.0f}s so far)")
    features = tuple(future.result() for future in texture_futures) or None     # None: computed below
    if jobs > 1 and todo:
        pool.shutdown()
    textures = (fit_fold_textures(out, paths, labels, groups, fold_table, extra, log, config.texture_intensities,
                                  features) if config.texture else {})
    for repeat in range(repeats):
        for fold in range(folds):
            held_out = [done[repeat, fold, number] for number in range(len(plan))]
            held_out += [scores for _, scores in textures.get((repeat, fold), [])]
            oof[repeat, fold_table[repeat] == fold] = combine_probabilities(held_out)
    fold_models = [str(Path(c.out) / "best.npz") for repeat, _, _, c, _, _ in tasks if repeat == 0]
    fold_textures = [texture for fold in range(folds) for texture, _ in textures.get((0, fold), [])]

    result = summarize(labels, oof, fold_table, target)
    result.update(config=asdict(config), folds=folds, repeats=repeats, tta=tta, members=members,
                  n_sources=len(set(groups)), seconds=time.perf_counter() - started)
    write_oof(out / "oof.csv", paths, labels, groups, fold_table, oof)
    save_ensemble(out / "ensemble.npz", fold_models, threshold=result["threshold"], tta=tta, textures=fold_textures,
                  info={"cv": {k: result[k] for k in ("pooled", "per_fold", "threshold", "threshold_rule")}})
    (out / "cv.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / "cv.md").write_text(format_cv_table(result) + "\n")
    return result


def fit_fold_textures(out: Path, paths, labels, groups, fold_table, extra=None, log=print,
                      intensities=("window",), features=None) -> dict:
    """The texture models (covidct.texture), one per gray scale of ``intensities``, of every repeat and
    fold, fitted on the fold's training slices (+ any extra training data) -> {(repeat, fold):
    [(TextureMember, P(COVID) on the held-out slices) per gray scale]}; each one's held-out predictions
    also go to r<R>-fold<F>-<texture_name>/heldout.csv (``texture``, ``texture-none-equalize``), so
    that cv-join takes RUN:texture like any other model. Fast (seconds a fold) and deterministic, so a
    resumed run fits them again. features: (texture_features of paths, of the extra slices) when they
    were computed already (cross_validate computes them beside the fold models), else None."""
    from .texture import fit_textures, gray_scale_features, texture_name

    if features is None:
        log(f"texture models ({', '.join(intensities)}): lung-texture features of "
            f"{len(paths) + (len(extra[2]) if extra else 0)} slices ...")
        features = [texture_features(list(p), intensities) for p in (paths, extra[2] if extra is not None else [])]
    (features, extra_features), groups = features, np.asarray(groups)
    if extra is not None:
        extra_groups = np.asarray(slice_groups(extra[2], extra[1]))
    fitted = {}
    for repeat, folds in enumerate(fold_table):
        for fold in np.unique(folds):
            train, test = folds != fold, folds == fold
            x, y, g = features[train], labels[train], groups[train]
            if extra is not None:
                x, y = np.concatenate([x, extra_features]), np.concatenate([y, extra[1]])
                g = np.concatenate([g, extra_groups])
            fitted[repeat, int(fold)] = []
            for index, texture in enumerate(fit_textures(x, y, g, intensities, seed=int(fold))):
                scores = texture.p_covid(gray_scale_features(features[test], index))
                fold_dir = out / f"r{repeat}-fold{fold}-{texture_name(texture.intensity)}"
                fold_dir.mkdir(parents=True, exist_ok=True)
                write_heldout(fold_dir, [p for p, keep in zip(paths, test) if keep], scores)
                fitted[repeat, int(fold)].append((texture, scores))
    for index, intensity in enumerate(intensities):
        aucs = [roc_auc(labels[folds == fold], fitted[repeat, int(fold)][index][1])
                for repeat, folds in enumerate(fold_table) for fold in np.unique(folds)]
        log(f"texture model ({intensity}): held-out AUC {np.mean(aucs):.3f} +/- {np.std(aucs):.3f} "
            f"over {len(aucs)} folds")
    return fitted


def summarize(labels, oof, fold_table, target_sensitivity: float | None = None) -> dict:
    """The metrics of out-of-fold predictions oof (R, N) of R fold draws (fold_table (R, N)): one threshold
    chosen on all R x N predictions (choose_oof_threshold); pooled metrics of those R x N predictions
    with a bootstrap CI of the AUC that resamples slices (each with its R predictions); per fold mean
    +/- sd; with R > 1 also each draw's pooled AUC.

    Every prediction pooled is one the recipe made on a slice it never trained on, so R draws measure
    the recipe R times over. The mean of a slice's R predictions (oof.csv's p_covid) would instead
    score an ensemble of R fold draws, which no recipe trains: on COVID-CT, 3 draws of the default
    recipe score 0.885 that way against 0.874 for the recipe (docs/cross_validation.md)."""
    draws = len(oof)
    stacked_labels, stacked = np.tile(labels, draws), np.ravel(oof)            # (R x N,)
    threshold, rule = choose_oof_threshold(stacked_labels, stacked, target_sensitivity)
    pooled = classification_metrics(stacked_labels, stacked, threshold)
    low, high = bootstrap_ci(labels, oof, roc_auc, n_boot=1000, seed=0)
    per_fold = {name: [] for name in ("auc", "accuracy", "sensitivity", "specificity")}
    for repeat in range(draws):
        for fold in np.unique(fold_table[repeat]):
            held = fold_table[repeat] == fold
            metrics = classification_metrics(labels[held], oof[repeat, held], threshold)
            for name in per_fold:
                per_fold[name].append(float(metrics[name]))
    summary = {name: {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1)) if len(v) > 1 else 0.0,
                      "values": v} for name, v in per_fold.items()}
    result = {"threshold": threshold, "threshold_rule": rule,
              "pooled": {k: pooled[k] for k in ("auc", "accuracy", "sensitivity", "specificity", "balanced_accuracy",
                                                 "tp", "tn", "fp", "fn")},
              "pooled_auc_ci95": [low, high], "per_fold": summary}
    if draws > 1:
        result["pooled_auc_per_repeat"] = [float(roc_auc(labels, scores)) for scores in oof]
    return result


def fold_columns_of(oof_frame) -> list[str]:
    """The fold columns of an oof.csv table (write_oof): fold_r0, fold_r1, ..., one per repeat."""
    return [column for column in oof_frame.columns if column.startswith("fold_r")]


def probability_column(fold_column: str) -> str:
    """The OOF probability column of a repeat: fold_r1 -> p_covid_r1."""
    return "p_covid_r" + fold_column[len("fold_r"):]


def model_names(run_dir) -> list[str]:
    """The models of a multi-model run that can be joined alone: the part after ``r0-fold0-`` of its
    fold folders (``none-window-default``, ``crop-deep-small``, ``m1-crop``, ...). Member 0 of a
    --members run of one view and preset has a folder without a name (``r0-fold0``): not listed."""
    return sorted(path.name[len("r0-fold0-"):] for path in Path(run_dir).glob("r0-fold0-*") if path.is_dir())


def read_oof(path: Path):
    """A run's oof.csv as a table sorted by file, or a one-line CovidCTError."""
    import pandas as pd

    if not path.is_file():
        raise CovidCTError(f"{path}: no such file; expected the folder of a finished `covidct cv` run")
    try:
        frame = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CovidCTError(f"{path}: not a readable CSV table ({reason})") from None
    numeric = [c for c in frame.columns if c == "label" or c.startswith(("fold_r", "p_covid_r"))]
    missing = ({"file", "label", "source", "fold_r0", "p_covid_r0"}
               | {probability_column(fold) for fold in fold_columns_of(frame)}) - set(frame.columns)
    if missing or frame.empty or not all(pd.api.types.is_numeric_dtype(frame[c]) for c in numeric):
        raise CovidCTError(f"{path}: not the oof.csv of a covidct cv run (expected rows with the columns "
                           f"file, label, source, fold_r0, p_covid_r0, ..., numbers but for file and source)")
    return frame.sort_values("file", kind="stable").reset_index(drop=True)


def _model_oof(run_dir: Path, model: str, frame):
    """``frame`` (the run's oof.csv) with its OOF probabilities replaced by those of one of the run's
    models: r<R>-fold<F>-<model>/heldout.csv of every repeat R and fold F."""
    import pandas as pd

    frame = frame.copy()
    for fold_column in fold_columns_of(frame):
        repeat = fold_column[len("fold_r"):]
        column = probability_column(fold_column)
        frame[column] = np.nan
        for fold in np.unique(frame[fold_column]):
            saved = run_dir / f"r{repeat}-fold{fold}-{model}" / "heldout.csv"
            if not saved.is_file():
                names = model_names(run_dir)
                known = f"its models: {', '.join(names)}" if names else "it trains one model per fold: join it whole"
                raise CovidCTError(f"{run_dir}:{model}: no held-out predictions in {saved} ({known})")
            try:
                held = pd.read_csv(saved)
                probability = dict(zip(held["file"], held["p_covid"].astype(np.float64)))
            except (ValueError, KeyError, UnicodeDecodeError, pd.errors.ParserError):
                raise CovidCTError(f"{saved}: not the heldout.csv of a covidct cv fold (expected the columns "
                                   f"file, p_covid)") from None
            rows = frame[fold_column] == fold
            if set(probability) != set(frame.loc[rows, "file"]):
                raise CovidCTError(f"{saved}: its slices are not those of fold {fold} in {run_dir / 'oof.csv'}")
            frame.loc[rows, column] = frame.loc[rows, "file"].map(probability)
    return frame


def _run_and_model(entry) -> tuple[Path, str | None]:
    """A cv-join argument: RUN (a run folder) or RUN:MODEL (one model of a multi-model run)."""
    path = Path(entry)
    if path.is_dir() or ":" not in str(entry):
        return path, None
    run, model = str(entry).rsplit(":", 1)
    return Path(run), model


def join_runs(run_dirs, target_sensitivity: float | None = None) -> dict:
    """Join finished cross-validations offline: each slice's OOF P(COVID) becomes the normalised
    geometric mean of the runs' (the mean of their log-odds, as an ensemble of their fold models
    combines them; a run of several models per fold counts once, as its own ensemble; ``RUN:MODEL``
    takes one model of such a run, ``model_names``), then the metrics of ``cross_validate``. The
    runs must have held out the same slices in the same folds (one --data, --seed, --folds and
    --repeats); anything else is refused, since joined predictions from other folds would be
    neither out-of-fold nor an ensemble."""
    from .ensemble import combine_probabilities

    if len(run_dirs) < 2:
        raise CovidCTError(f"cv-join: give two or more cross-validation runs to join, got {len(run_dirs)}")
    if target_sensitivity is not None and not 0 < target_sensitivity <= 1:
        raise CovidCTError(f"--target-sensitivity {target_sensitivity}: expected a fraction in (0, 1]")
    frames = []
    for entry in run_dirs:
        run, model = _run_and_model(entry)
        frame = read_oof(run / "oof.csv")
        frames.append(frame if model is None else _model_oof(run, model, frame))
    first = frames[0]
    fold_columns = fold_columns_of(first)                                     # fold_r0, fold_r1, ...: one per repeat
    for run, frame in zip(run_dirs[1:], frames[1:]):
        if len(frame) != len(first) or (frame["file"].values != first["file"].values).any() \
                or (frame["label"].values != first["label"].values).any():
            raise CovidCTError(f"{run}: its slices differ from those of {run_dirs[0]}; join runs on the same --data")
        if fold_columns_of(frame) != fold_columns \
                or (frame[fold_columns].values != first[fold_columns].values).any():
            raise CovidCTError(f"{run}: its folds differ from those of {run_dirs[0]}; join runs with the same "
                               f"--seed, --folds and --repeats")
    labels = first["label"].values.astype(np.int64)
    fold_table = first[fold_columns].values.T.astype(np.int64)                  # (repeats, N)
    oof = np.stack([combine_probabilities([frame[probability_column(fold)].values for frame in frames])
                    for fold in fold_columns])                                   # (repeats, N)
    if not np.isfinite(oof).all():
        raise CovidCTError("cv-join: a run holds slices without an out-of-fold probability; finish it first "
                           "(covidct cv --resume RUN)")
    result = summarize(labels, oof, fold_table, target_sensitivity)
    result.update(runs=[str(run) for run in run_dirs], folds=int(fold_table.max()) + 1, repeats=len(fold_columns),
                  n_sources=int(first["source"].nunique()))
    return result


def write_oof(path: Path, paths, labels, groups, fold_table, oof) -> None:
    """oof.csv: file, label, source, p_covid (the mean over the repeats' predictions; with one repeat its
    own), then fold_r<R> and p_covid_r<R> of every repeat."""
    import pandas as pd

    frame = pd.DataFrame({"file": paths, "label": labels, "source": groups, "p_covid": oof.mean(axis=0)})
    for repeat in range(len(oof)):
        frame[f"fold_r{repeat}"] = fold_table[repeat]
        frame[f"p_covid_r{repeat}"] = oof[repeat]
    frame.to_csv(path, index=False)


def recipe_text(config) -> str:
    """The models per fold of a TrainConfig, as the log and cv.md say it: " x 2 views (--lungs none,crop
    --intensity none) x 2 models (--model default,deep-small)"; presets with views of their own
    (--model deep-small:none-equalize) make no product: " x 5 models (--model ... --lungs ...)"."""
    from .train import ensemble_members

    text = f" x {config.members} seeds per fold" if config.members > 1 else ""
    views, models, plan = len(config.views), len(config.model_views), len(ensemble_members(config)) // config.members
    count = len(config.texture_intensities)
    texture = " + the lung-texture model" if count == 1 else f" + {count} lung-texture models" if count else ""
    if views * models != plan:
        return (text + f" x {plan} models{texture} (--model {config.model} --lungs {config.lungs} "
                f"--intensity {config.intensity})")
    text += f" x {views} views (--lungs {config.lungs} --intensity {config.intensity})" if views > 1 else ""
    return text + (f" x {models} models (--model {config.model})" if models > 1 else "") + texture


def format_cv_table(result: dict) -> str:
    """cv.json as a small Markdown table (mean +/- sd over folds, pooled OOF with a CI)."""
    fold, pooled = result["per_fold"], result["pooled"]
    low, high = result["pooled_auc_ci95"]
    config = result.get("config", {})
    from .train import TrainConfig

    plan = f"{result.get('folds')} folds x {result.get('repeats')} repeats"
    if "runs" in result:                                  # join_runs
        what = f"{len(result['runs'])} cross-validations joined ({', '.join(result['runs'])}): {plan}"
    else:
        recipe = TrainConfig(data="", members=result.get("members", 1), **{key: config.get(key, "none") for key in
                                                                              ("lungs", "intensity")},
                             model=config.get("model", "default"))
        what = f"Cross-validation: {plan}{recipe_text(recipe)}"
    lines = [f"{what}, {result.get('n_sources')} sources; threshold {result['threshold']:.3f} "
             f"({result['threshold_rule']})", "",
             "| metric | per fold (mean +/- sd) | pooled out-of-fold |", "|---|---|---|",
             f"| ROC AUC | {fold['auc']['mean']:.3f} +/- {fold['auc']['sd']:.3f} | {pooled['auc']:.3f} "
             f"(95 % CI {low:.3f}-{high:.3f}) |"]
    for name in ("accuracy", "sensitivity", "specificity"):
        lines.append(f"| {name} | {fold[name]['mean']:.3f} +/- {fold[name]['sd']:.3f} | {pooled[name]:.3f} |")
    if "pooled_auc_per_repeat" in result:          # R fold draws, pooled above as R x N predictions
        each = result["pooled_auc_per_repeat"]
        lines += ["", f"Pooled out-of-fold AUC of each of the {len(each)} fold draws: "
                      f"{', '.join(f'{auc:.3f}' for auc in each)} (mean {np.mean(each):.3f})"]
    return "\n".join(lines)
