"""Cross-validate the lung-texture logistic regression on the folds of a finished `covidct cv` run.

    python examples/texture_member.py runs/cv-a                  # -> runs/cv-a-texture
    covidct cv-join runs/cv-a:none-window-default ... runs/cv-a-texture:texture

The default recipe holds the texture model already (`--model ...,texture`: `covidct cv` fits it
per fold, `covidct train` saves it in ensemble.npz). This adds it, afterwards, to a run made
without it (another recipe, or one trained before session 13), to see what it would bring.

For every repeat and fold of RUN (its oof.csv: the same slices held out), it fits
``covidct.texture``'s logistic regression on the other folds' slices (the L2 strength chosen by an
inner grouped CV on them alone: ``covidct.cv.fit_fold_textures``, as `covidct cv` does) and scores
the held-out ones; it writes OUT/oof.csv in the format of `covidct cv` (and OUT/r<R>-fold<F>-texture/
heldout.csv), so `covidct cv-join` joins it with RUN's models like any other run, and prints its own
table and RUN joined with it as one more member (each of RUN's models and the texture model weigh
alike, as in the saved ensemble). About 1 min for COVID-CT's 543 slices on 2 cores.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from covidct.cli import run_reporting_errors  # noqa: E402
from covidct.cv import (fit_fold_textures, fold_columns_of, format_cv_table,  # noqa: E402
                        join_runs, model_names, read_oof, summarize, write_oof)
from covidct.errors import CovidCTError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished covidct cv run folder (its oof.csv gives the folds)")
    parser.add_argument("--out", default=None, help="where to write oof.csv (default: RUN-texture)")
    args = parser.parse_args(argv)
    return run_reporting_errors(run, args)


def run(args) -> int:
    run_dir = Path(args.run)
    out = Path(args.out) if args.out else run_dir.with_name(run_dir.name + "-texture")
    frame = read_oof(run_dir / "oof.csv")
    missing = [f for f in frame["file"] if not Path(f).is_file()]
    if missing:
        raise CovidCTError(f"{missing[0]}: no such file ({len(missing)} of the slices in {run_dir / 'oof.csv'} "
                           f"are missing); run this where the run's data is")
    if (run_dir / "r0-fold0-texture").is_dir():
        raise CovidCTError(f"{run_dir}: holds the texture model already (r0-fold0-texture/; --model ...,texture); "
                           f"its oof.csv includes it")
    paths, labels = list(frame["file"]), frame["label"].to_numpy(np.int64)
    sources = frame["source"].astype(str).to_numpy()
    fold_table = frame[fold_columns_of(frame)].to_numpy(np.int64).T      # (repeats, N)
    fitted = fit_fold_textures(out, paths, labels, sources, fold_table)
    oof = np.full(fold_table.shape, np.nan)                                 # (repeats, N)
    for (repeat, fold), [(_, scores)] in fitted.items():
        oof[repeat, fold_table[repeat] == fold] = scores
    write_oof(out / "oof.csv", paths, labels, sources, fold_table, oof)
    l2 = {f"r{repeat}-fold{fold}": texture.l2 for (repeat, fold), [(texture, _)] in fitted.items()}
    (out / "texture.json").write_text(json.dumps({"run": str(run_dir), "l2_per_fold": l2}, indent=2) + "\n")
    alone = summarize(labels, oof, fold_table)
    low, high = alone["pooled_auc_ci95"]
    print(f"wrote {out / 'oof.csv'}; the texture model alone: pooled OOF AUC {alone['pooled']['auc']:.3f} "
          f"(95 % CI {low:.3f}-{high:.3f}), per fold {alone['per_fold']['auc']['mean']:.3f} +/- "
          f"{alone['per_fold']['auc']['sd']:.3f}\n")
    # each of RUN's models one member, the texture model another; a run whose fold folders are not all
    # named (one model per fold, or member 0 of --members M) is joined whole
    names = model_names(run_dir)
    split = names and not (run_dir / "r0-fold0").is_dir()
    models = [f"{run_dir}:{name}" for name in names] if split else [str(run_dir)]
    print(f"{run_dir}'s models with the texture model as one more member:")
    print(format_cv_table(join_runs(models + [out])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
