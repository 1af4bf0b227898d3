"""Cross-validation (covidct.cv) and fold ensembles (covidct.ensemble) on tiny phantom data."""
import json
import re

import numpy as np
import pytest

from covidct.checkpoint import load_checkpoint
from covidct.cv import (cross_validate, format_cv_table, grouped_folds, join_runs, model_names, slice_groups,
                        source_group, youden_threshold)
from covidct.ensemble import Ensemble, combine_probabilities
from covidct.errors import CovidCTError
from covidct.evaluate import predict_proba
from covidct.synthetic import write_dataset
from covidct.train import TrainConfig


def test_source_groups_follow_the_file_name_rules():
    assert source_group("x/2020.02.25.20021568-p23-108%2.png", 1) == "covid:2020.02.25.20021568"
    assert source_group("x/2020.02.25.20021568-p24-111.png", 1) == "covid:2020.02.25.20021568"
    assert source_group("x/39%1.jpg", 0) == "0:39"
    paths = ["1058.png", "1059.png", "1060.png", "1070.png", "39%0.jpg", "39%2.jpg", "2020.1-p1.png",
             "40%0.jpg", "41.jpg", "1061.jpg"]
    labels = [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    groups = slice_groups(paths, labels)
    assert groups[0] == groups[1] == groups[2] != groups[3]          # consecutive numbers: one run
    assert groups[4] == groups[5]                                    # one case: 39
    assert groups[7] != groups[4] and groups[8] != groups[7]         # neighbouring cases are other patients
    assert groups[9] != groups[2]                                    # another extension: another run
    assert len(set(groups)) == 7


def test_folds_keep_groups_whole_and_classes_balanced():
    rng = np.random.default_rng(0)
    groups = [f"g{i}" for i in range(40) for _ in range(rng.integers(1, 6))]
    labels = np.array([int(g[1:]) % 2 for g in groups])
    folds = grouped_folds(labels, groups, k=5, seed=3)
    for g in set(groups):
        assert len({folds[i] for i, h in enumerate(groups) if h == g}) == 1
    per_fold = np.array([[np.sum((folds == f) & (labels == c)) for c in (0, 1)] for f in range(5)])
    assert per_fold.min() > 0 and (per_fold.max(axis=0) - per_fold.min(axis=0)).max() <= 6
    assert np.array_equal(folds, grouped_folds(labels, groups, k=5, seed=3))
    with pytest.raises(CovidCTError, match="--folds 50"):
        grouped_folds(labels, groups, k=50)


def test_youden_threshold_separates_separable_scores():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    threshold = youden_threshold(labels, scores)
    assert 0.3 < threshold <= 0.6


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    data = write_dataset(root / "data", n=40, seed=4, size=32)
    extra = write_dataset(root / "extra", n=16, seed=5, size=32)
    config = TrainConfig(data=str(data), out=str(root / "run"), model="tiny", epochs=2, batch_size=8,
                         cache_dir=str(root / "cache"), progress=False, lungs="crop",
                         extra_data=(str(extra / "Images-processed"),))
    logs = []
    result = cross_validate(config, folds=3, repeats=2, log=logs.append)
    return config, result, logs


def test_cv_writes_out_of_fold_predictions_for_train_and_val_only(cv_run):
    config, result, logs = cv_run
    import pandas as pd

    from pathlib import Path
    run = Path(config.out)
    oof = pd.read_csv(run / "oof.csv")
    assert len(oof) == 34                                   # train 28 + val 6 of the 40; no extra, no test
    assert not oof["file"].str.contains("extra").any()
    assert oof["p_covid"].between(0, 1).all()
    assert np.allclose(oof["p_covid"], (oof["p_covid_r0"] + oof["p_covid_r1"]) / 2)
    saved = json.loads((run / "cv.json").read_text())
    assert saved["folds"] == 3 and saved["repeats"] == 2 and len(saved["per_fold"]["auc"]["values"]) == 6
    assert "ROC AUC" in (run / "cv.md").read_text()
    assert any("+ 16 extra training slices" in line for line in logs)
    fold_log = (run / "r0-fold0" / "history.csv").read_text()
    assert fold_log.count("\n") == 3                       # header + 2 epochs: fixed epochs, last kept


def test_repeats_pool_every_draws_predictions_not_their_mean(cv_run):
    """--repeats R measures the recipe R times: the threshold and the pooled metrics take all R x N
    out-of-fold predictions, and each draw's pooled AUC is listed; the mean of a slice's R predictions
    (an ensemble of R draws) is not what is scored."""
    import pandas as pd

    from covidct.cv import choose_oof_threshold, summarize
    from covidct.metrics import classification_metrics, roc_auc
    config, result, _ = cv_run
    from pathlib import Path
    run = Path(config.out)
    oof = pd.read_csv(run / "oof.csv")
    labels, draws = oof["label"].to_numpy(), oof[["p_covid_r0", "p_covid_r1"]].to_numpy().T
    stacked_labels, stacked = np.tile(labels, 2), draws.ravel()
    assert result["threshold"] == pytest.approx(choose_oof_threshold(stacked_labels, stacked, None)[0])
    assert result["pooled"]["auc"] == pytest.approx(roc_auc(stacked_labels, stacked))
    at_threshold = classification_metrics(stacked_labels, stacked, result["threshold"])
    assert (result["pooled"]["tp"], result["pooled"]["fn"]) == (at_threshold["tp"], at_threshold["fn"])
    assert result["pooled"]["tp"] + result["pooled"]["fn"] == 2 * labels.sum()     # every draw's COVID slices
    assert result["pooled_auc_per_repeat"] == pytest.approx([roc_auc(labels, d) for d in draws])
    assert "of each of the 2 fold draws" in (run / "cv.md").read_text()
    # two draws whose errors differ: their mean ranks better than either, and is not reported
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    noisy = np.stack([1 / (1 + np.exp(-(labels + rng.normal(0, 1, 200)))) for _ in range(2)])
    folds = np.tile(np.arange(200) % 5, (2, 1))
    summary = summarize(labels, noisy, folds)
    assert roc_auc(labels, noisy.mean(axis=0)) > max(summary["pooled_auc_per_repeat"]) + 0.01
    assert summary["pooled"]["auc"] == pytest.approx(roc_auc(np.tile(labels, 2), noisy.ravel()))
    assert summary["pooled"]["auc"] < roc_auc(labels, noisy.mean(axis=0)) - 0.01
    assert "pooled_auc_per_repeat" not in summarize(labels, noisy[:1], folds[:1])


def test_the_fold_ensemble_combines_its_members(cv_run):
    config, result, _ = cv_run
    from pathlib import Path
    run = Path(config.out)
    ensemble, meta = load_checkpoint(run / "ensemble.npz")
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 3
    assert meta["threshold"] == pytest.approx(result["threshold"])
    assert meta["preprocess"]["lungs"] == "crop"
    assert ensemble.tta                                      # config.tta, the recipe's default
    ensemble.tta = False
    images = np.random.default_rng(0).random((5, 1, 32, 32), dtype=np.float32)
    together = predict_proba(ensemble, images, meta["normalization"]["mean"], meta["normalization"]["std"])
    alone = []
    for fold in range(3):
        model, member = load_checkpoint(run / f"r0-fold{fold}" / "best.npz")
        alone.append(predict_proba(model, images, member["normalization"]["mean"], member["normalization"]["std"]))
    assert np.allclose(together, combine_probabilities(alone), atol=1e-6)
    ensemble.tta = True                                      # flip TTA: mirror images average in
    mirrored = predict_proba(ensemble, images, 0.0, 1.0)
    flipped = predict_proba(ensemble, images[..., ::-1].copy(), 0.0, 1.0)
    assert np.allclose(mirrored, flipped, atol=1e-6) and not np.allclose(mirrored, together)
    with pytest.raises(CovidCTError, match="inference only"):
        ensemble.backward(np.zeros((5, 2), np.float32))


def test_cv_gradcam_explains_each_held_out_slice_with_its_folds_models(tmp_path, capsys):
    import pandas as pd

    from covidct import COVID
    from covidct.cli import main
    from covidct.ensemble import save_ensemble
    from covidct.gradcam import frame_boxes_of, gradcam, mass_inside
    from covidct.preprocess import Preprocess, input_lung_mask, load_image, read_gray
    data = write_dataset(tmp_path / "data", n=24, seed=3, size=64)        # 64 px: the masks are found
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="tiny", epochs=2, batch_size=8,
                         cache_dir=str(tmp_path / "cache"), progress=False, lungs="crop,none")
    result = cross_validate(config, folds=2, log=lambda line: None)
    run = tmp_path / "run"
    assert main(["viz", "cv-gradcam", str(run)]) == 0
    assert "| repeat 1 fold 2 |" in capsys.readouterr().out
    saved = json.loads((run / "gradcam.json").read_text())
    oof = pd.read_csv(run / "oof.csv")
    assert [row["n"] for row in saved["folds"]] == [int((oof["fold_r0"] == fold).sum()) for fold in range(2)]
    assert saved["pooled"]["n"] == len(oof) and 0 < saved["pooled"]["mass_inside_lungs"] < 1
    # fold 1 by hand: its two models (the whole slice's frame first, the crop's heat pasted into it) on
    # each held-out slice and its mirror image, for the class the recipe predicts out of fold
    held_out = oof[oof["fold_r0"] == 0]
    fold_models = [run / f"r0-fold0-{view}" / "best.npz" for view in ("none", "crop")]
    model, meta = load_checkpoint(save_ensemble(tmp_path / "fold0.npz", fold_models, result["threshold"], tta=True))
    preprocess = Preprocess.from_dict(meta["preprocess"])
    x = np.stack([load_image(path, preprocess) for path in held_out["file"]])    # ensembles take [0, 1] images
    targets = np.where(held_out["p_covid_r0"] >= result["threshold"], COVID, 1 - COVID)
    heat = gradcam(model, x, targets, boxes=frame_boxes_of(model, preprocess, map(read_gray, held_out["file"])))
    whole_slice = Preprocess(size=preprocess.size, lungs="none")
    masks = [input_lung_mask(read_gray(path), whole_slice) for path in held_out["file"]]
    shares = [mass_inside(h, mask) if mask is not None else np.nan for h, mask in zip(heat, masks)]
    used = np.isfinite(shares)
    assert saved["folds"][0]["n_used"] == used.sum() > len(held_out) // 2
    assert saved["folds"][0]["mass_inside_lungs"] == pytest.approx(np.nanmean(shares), abs=1e-5)
    areas = [mask.mean() for mask, ok in zip(masks, used) if ok]
    assert saved["folds"][0]["lung_mask_area"] == pytest.approx(np.mean(areas))
    assert main(["viz", "cv-gradcam", str(run / "r0-fold0-none")]) == 2
    error = capsys.readouterr().err
    assert "not a finished covidct cv run" in error and len(error.strip().splitlines()) == 1

def test_tta_scores_join_each_slice_and_its_mirror_image(cv_run):
    """What a fold model scores with config.tta (held-out predictions, the fold ensemble)."""
    from pathlib import Path

    from covidct.evaluate import predict_checkpoint
    config, _, _ = cv_run
    path = Path(config.out) / "r0-fold1" / "best.npz"
    images = np.random.default_rng(1).random((6, 1, 32, 32), dtype=np.float32)
    mirrored = images[..., ::-1].copy()
    with_tta = predict_checkpoint(path, images, tta=True)
    plain = predict_checkpoint(path, images)
    assert np.allclose(with_tta, combine_probabilities([plain, predict_checkpoint(path, mirrored)]), atol=1e-6)
    assert np.allclose(predict_checkpoint(path, mirrored, tta=True), with_tta, atol=1e-6)   # mirror-invariant
    assert not np.allclose(with_tta, plain, atol=1e-4)


def test_cv_is_deterministic_per_seed(cv_run, tmp_path):
    config, result, _ = cv_run
    from dataclasses import replace
    again = cross_validate(replace(config, out=str(tmp_path / "again")), folds=3, repeats=2, log=lambda *_: None)
    assert again["pooled"] == result["pooled"] and again["threshold"] == result["threshold"]


def test_members_average_seeds_per_fold(cv_run, tmp_path):
    """--members 2: each fold's held-out probability combines two seeds' models, member 0 is the
    single-model run, and the ensemble holds every fold's members."""
    import pandas as pd
    from dataclasses import replace
    config, _, _ = cv_run
    single = cross_validate(replace(config, out=str(tmp_path / "one")), folds=2, log=lambda *_: None)
    logs = []
    pair = cross_validate(replace(config, out=str(tmp_path / "two"), members=2), folds=2, log=logs.append)
    assert sum("held-out AUC" in line for line in logs) == 4 and any("x 2 seeds per fold" in l for l in logs)
    oof = pd.read_csv(tmp_path / "two" / "oof.csv").set_index("file")
    for fold in range(2):
        first = pd.read_csv(tmp_path / "two" / f"r0-fold{fold}" / "heldout.csv").set_index("file")["p_covid"]
        second = pd.read_csv(tmp_path / "two" / f"r0-fold{fold}-m1" / "heldout.csv").set_index("file")["p_covid"]
        alone = pd.read_csv(tmp_path / "one" / f"r0-fold{fold}" / "heldout.csv").set_index("file")["p_covid"]
        assert np.allclose(first, alone) and not np.allclose(first, second)     # another seed, another model
        assert np.allclose(oof.loc[first.index, "p_covid"], combine_probabilities([first, second]))
    ensemble, _ = load_checkpoint(tmp_path / "two" / "ensemble.npz")
    assert len(ensemble.members) == 4 and pair["members"] == 2 and single["members"] == 1
    assert "2 seeds per fold" in (tmp_path / "two" / "cv.md").read_text()
    with pytest.raises(CovidCTError, match="--members must be >= 1"):
        cross_validate(replace(config, out=str(tmp_path / "none"), members=0), folds=2)


def test_cv_join_scores_finished_runs_as_their_ensemble(cv_run, tmp_path, capsys):
    """Joining a whole-slice and a lung-crop CV of one fold draw gives what a two-view CV run measures
    (its models are the same models); runs of other folds or other data, and broken files, are refused
    with one line."""
    import pandas as pd
    from dataclasses import replace
    from covidct.cli import main
    config, result, _ = cv_run
    itself = join_runs([config.out, config.out])               # 3 folds x 2 repeats, joined with itself
    assert (itself["folds"], itself["repeats"]) == (3, 2)
    assert itself["pooled"]["auc"] == pytest.approx(result["pooled"]["auc"], abs=1e-12)
    assert itself["threshold"] == pytest.approx(result["threshold"], abs=1e-12)
    quiet = lambda *_: None
    for name, lungs in (("whole", "none"), ("crop", "crop"), ("both", "none,crop")):
        cross_validate(replace(config, out=str(tmp_path / name), lungs=lungs, extra_data=()), folds=2, log=quiet)
    both = json.loads((tmp_path / "both" / "cv.json").read_text())
    joined = join_runs([tmp_path / "whole", tmp_path / "crop"])
    assert joined["pooled"]["auc"] == pytest.approx(both["pooled"]["auc"], abs=1e-9)
    assert joined["threshold"] == pytest.approx(both["threshold"], abs=1e-9)
    assert joined["per_fold"]["accuracy"]["values"] == pytest.approx(both["per_fold"]["accuracy"]["values"])
    assert joined["folds"] == 2 and joined["repeats"] == 1
    assert format_cv_table(joined).startswith("2 cross-validations joined")
    assert join_runs([tmp_path / "whole", tmp_path / "crop"], target_sensitivity=1.0)["pooled"]["sensitivity"] == 1.0
    # RUN:MODEL, one model of a multi-model run: the two-view run's models are the single-view runs' models
    assert model_names(tmp_path / "both") == ["crop", "none"]
    by_model = join_runs([f"{tmp_path / 'both'}:none", f"{tmp_path / 'both'}:crop"])
    assert by_model["pooled"] == pytest.approx(both["pooled"])
    assert by_model["threshold"] == pytest.approx(both["threshold"])
    whole = json.loads((tmp_path / "whole" / "cv.json").read_text())
    assert join_runs([f"{tmp_path / 'both'}:none", tmp_path / "whole"])["pooled"]["auc"] == \
        pytest.approx(whole["pooled"]["auc"], abs=1e-12)

    oof = pd.read_csv(tmp_path / "whole" / "oof.csv")
    (tmp_path / "moved").mkdir()
    oof.assign(fold_r0=1 - oof["fold_r0"]).to_csv(tmp_path / "moved" / "oof.csv", index=False)
    (tmp_path / "fewer").mkdir()
    oof.iloc[1:].to_csv(tmp_path / "fewer" / "oof.csv", index=False)
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "oof.csv").write_bytes(bytes(range(256)))
    assert main(["cv-join", str(tmp_path / "whole"), str(tmp_path / "crop")]) == 0
    assert "2 cross-validations joined" in capsys.readouterr().out
    for runs, message in [(["moved"], "its folds differ"), (["fewer"], "its slices differ"),
                          (["garbage"], "not a readable CSV table"), (["nowhere"], "no such file"),
                          ([], "give two or more"), (["both:lungs"], "its models: crop, none"),
                          (["whole:crop"], "trains one model per fold")]:
        assert main(["cv-join", str(tmp_path / "whole"), *(str(tmp_path / run) for run in runs)]) == 2
        error = capsys.readouterr().err
        assert message in error and len(error.strip().splitlines()) == 1, error


def test_extra_data_pretrain_mode_trains_a_start_once(cv_run, tmp_path):
    config, _, _ = cv_run
    from dataclasses import replace
    logs = []
    cross_validate(replace(config, out=str(tmp_path / "pre"), extra_mode="pretrain", extra_epochs=1), folds=2,
                   log=logs.append)
    assert (tmp_path / "pre" / "pretrain-extra" / "best.npz").is_file()
    assert any("pretraining on 16 extra slices" in line for line in logs)
    fold_config = json.loads((tmp_path / "pre" / "r0-fold0" / "config.json").read_text())
    assert fold_config["pretrained"].endswith("pretrain-extra/best.npz") and fold_config["extra_data"] == []


def test_folds_in_worker_processes_give_the_same_predictions(cv_run, tmp_path):
    config, _, _ = cv_run
    from dataclasses import replace
    one = cross_validate(replace(config, out=str(tmp_path / "one"), extra_data=()), folds=2, log=lambda *_: None)
    two = cross_validate(replace(config, out=str(tmp_path / "two"), extra_data=()), folds=2, jobs=2,
                         log=lambda *_: None)
    assert two["pooled"] == one["pooled"] and two["per_fold"] == one["per_fold"]
    with pytest.raises(CovidCTError, match="--jobs"):
        cross_validate(config, folds=2, jobs=0)


def test_a_stopped_cv_run_resumes_to_the_same_result(cv_run, tmp_path, monkeypatch):
    from dataclasses import replace

    from covidct.train import Trainer
    config = replace(cv_run[0], extra_data=())
    whole = cross_validate(replace(config, out=str(tmp_path / "whole")), folds=3, log=lambda *_: None)

    train_epoch, epochs_run = Trainer.train_epoch, []

    def stop_in_the_second_fold(self, epoch):          # fold 1: epochs 1 and 2; fold 2: epoch 1, then Ctrl-C
        if len(epochs_run) == 3:
            raise KeyboardInterrupt
        epochs_run.append(epoch)
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_the_second_fold)
    stopped = replace(config, out=str(tmp_path / "stopped"))
    with pytest.raises(KeyboardInterrupt):
        cross_validate(stopped, folds=3, log=lambda *_: None)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    run = tmp_path / "stopped"
    assert (run / "r0-fold0" / "heldout.csv").is_file() and not (run / "r0-fold1" / "heldout.csv").exists()
    assert (run / "r0-fold1" / "last.npz").is_file() and not (run / "oof.csv").exists()

    logs = []
    resumed = cross_validate(stopped, folds=3, resume=True, log=logs.append)
    assert any("1 of 3 folds done" in line for line in logs)
    assert sum("held-out AUC" in line for line in logs) == 2                  # folds 2 and 3 only
    assert "resuming" in (run / "r0-fold1" / "log.txt").read_text()           # continued, not restarted
    assert resumed["pooled"] == whole["pooled"] and resumed["per_fold"] == whole["per_fold"]


def test_cv_resume_on_the_command_line(tmp_path):
    import subprocess
    import sys
    data = write_dataset(tmp_path / "data", n=24, seed=2, size=32)
    run = tmp_path / "run"

    def covidct_cv(*args):
        return subprocess.run([sys.executable, "-m", "covidct", "cv", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    first = covidct_cv("--data", data, "--out", run, "--model", "tiny", "--epochs", "1", "--batch-size", "8",
                       "--lungs", "none", "--no-tta",
                       "--folds", "2", "--no-progress", "--cache-dir", tmp_path / "cache")
    assert first.returncode == 0, first.stderr
    saved = json.loads((run / "config.json").read_text())
    assert saved["cv"] == {"folds": 2, "repeats": 1} and saved["tta"] is False
    assert load_checkpoint(run / "ensemble.npz")[1]["tta"] is False
    again = covidct_cv("--resume", run)
    assert again.returncode == 0, again.stderr
    def table(stdout):                                # the same figures; only the "(0.1 min)" may differ
        return re.sub(r"\(\d+\.\d min\)", "", stdout.split("Cross-validation:")[1])
    assert "2 of 2 folds done" in again.stdout and table(again.stdout) == table(first.stdout)
    for args, message in [(("--resume", run, "--folds", "3"), "--folds cannot change"),
                          (("--resume", run, "--lr", "0.1"), "--lr cannot change"),
                          (("--resume", run, "--epochs", "3"), "--epochs cannot change"),
                          (("--resume", data), "no config.json there"),
                          (("--resume", run / "r0-fold0"), "not a covidct cv run folder")]:
        refused = covidct_cv(*args)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
