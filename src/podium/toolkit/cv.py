"""k-fold cross-validation of one config, over the engine's folds and saved prediction sets.

    podium cv experiment=digits cv.folds=5 --out runs/cv-digits
    podium cv experiment=digits model=timm cv.splits=runs/cv-digits/splits.json --out runs/cv-timm

    from podium.toolkit.cv import run_cv
    report = run_cv(cfg, "runs/cv-digits", console)         # cfg from podium.config.compose

What OUT holds:
    splits.json               the folds (podium.engine.folds); a rerun reuses it, another model
                              takes it with cv.splits=OUT/splits.json and gets the same folds
    fold_<k>/                 an ordinary run folder whose val split is fold k (held out)
    predictions/oof/          the folds' val predictions concatenated: every pool sample once,
                              each predicted by the model that never saw it
    predictions/<test split>/ the folds' test predictions averaged (a k-model ensemble)
    cv.json                   scores per fold, their mean and std, OOF and test scores

Crash-safe: a fold with metrics.json is finished and skipped; a fold with checkpoints/last.pt
but no metrics.json is resumed; folds run one after the other in this process.
Task-agnostic: scores come from the fold runs' own task (`Task.score_predictions`), or from
their metrics.json for a family that cannot score saved sets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from podium.errors import UserError

REPORT = "cv.json"
SPLITS = "splits.json"
SAME_MODEL_GROUPS = ("task", "data", "model", "loss")  # a finished fold must match these


def prepare_splits(cfg, out_dir) -> tuple[Path, dict]:
    """OUT/splits.json: cv.splits (checked against the data, copied), else the existing
    OUT/splits.json (reused), else new folds from cv.folds / cv.group_by / cv.seed."""
    from podium.engine import registry
    from podium.engine.folds import pool_keys, read_splits, resolve_splits, write_splits

    out_dir = Path(out_dir)
    path = out_dir / SPLITS
    task = registry.build("task", cfg.task.name, cfg)
    keys, _ = pool_keys(task, task.build_datasets())
    cv = OmegaConf.create(OmegaConf.to_container(cfg.cv))
    source = cv.splits or (str(path) if path.is_file() else None)
    if source is None and cv.folds < 2:
        raise UserError(f"podium cv needs cv.folds=N with N >= 2 (got cv.folds={cv.folds}), "
                        "or cv.splits=FILE to reuse the folds of another CV.")
    cv.splits = source
    splits = resolve_splits(cv, keys)
    if source is not None and Path(source).resolve() != path.resolve():
        if path.is_file() and read_splits(path)["ids"] != splits["ids"]:
            raise UserError(f"{path} holds other folds than cv.splits={source}; choose another --out.")
        write_splits(path, splits)
    elif source is None:
        write_splits(path, splits)
    return path, splits


def fold_config(cfg, out_dir: Path, fold: int, splits_path: Path, n_folds: int):
    """The config of fold `fold`: the user's, holding that fold out, in OUT/fold_<k>."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    c.cv.fold, c.cv.folds, c.cv.splits = fold, n_folds, str(splits_path.resolve())
    c.run.dir = str(Path(out_dir) / f"fold_{fold}")
    OmegaConf.set_struct(c, True)
    return c


def _check_same_model(cfg, fold_dir: Path) -> None:
    from podium.engine.runconfig import load_run_config

    stored = load_run_config(fold_dir, [])
    for group in SAME_MODEL_GROUPS:
        if OmegaConf.to_container(stored[group]) != OmegaConf.to_container(cfg[group]):
            raise UserError(f"{fold_dir} was trained with another {group} config ({group}.name="
                            f"{stored[group].get('name')}); choose another --out for this one.")


def train_folds(cfg, out_dir, console, splits_path: Path, n_folds: int) -> list[dict]:
    """Train every fold not finished yet; return [{"fold", "run", "status"}]."""
    from podium.engine import session
    from podium.engine.runconfig import load_run_config

    done = []
    for k in range(n_folds):
        fold_cfg = fold_config(cfg, out_dir, k, splits_path, n_folds)
        fold_dir = Path(fold_cfg.run.dir)
        if (fold_dir / "config.yaml").is_file():
            _check_same_model(fold_cfg, fold_dir)
        if (fold_dir / "metrics.json").is_file():
            console.print(f"fold {k}: finished, skipped ({fold_dir})", highlight=False)
            status = "skipped"
        elif (fold_dir / "checkpoints" / "last.pt").is_file():
            console.print(f"fold {k}: resuming {fold_dir}", highlight=False)
            session.train(load_run_config(fold_dir, []), console, resume_dir=fold_dir)
            status = "resumed"
        else:
            console.print(f"fold {k}/{n_folds}: training into {fold_dir}", highlight=False)
            session.train(fold_cfg, console)
            status = "trained"
        done.append({"fold": k, "run": str(fold_dir), "status": status})
    return done


def _fold_scores(scorer, fold_dir: Path, prediction_set) -> dict:
    """A fold's held-out scores: re-scored from its saved set, else its metrics.json's val/*."""
    import json

    if scorer is not None:
        return scorer.score_predictions(prediction_set, "val")
    metrics = json.loads((fold_dir / "metrics.json").read_text())
    return {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}


def _scalars(scores: dict) -> dict[str, float]:
    return {k: float(v) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "/" not in k}


def summarise(out_dir, n_folds: int) -> dict:
    """OOF and averaged test sets under OUT/predictions/, scores per fold, mean ± std."""
    from podium.engine.predictions import combine, concat, read_predictions
    from podium.toolkit.ensemble import _scoring_task, main_metric, run_splits

    out_dir = Path(out_dir)
    fold_dirs = [out_dir / f"fold_{k}" for k in range(n_folds)]
    scorer = _scoring_task(fold_dirs[0])
    val_sets = [read_predictions(d / "predictions" / "val") for d in fold_dirs]  # UserError names a missing one
    per_fold = [_scalars(_fold_scores(scorer, d, s)) for d, s in zip(fold_dirs, val_sets)]
    names = [n for n in per_fold[0] if all(n in f for f in per_fold)]
    mean = {n: float(np.mean([f[n] for f in per_fold])) for n in names}
    std = {n: float(np.std([f[n] for f in per_fold])) for n in names}  # population std over folds

    oof = concat(val_sets)
    oof.manifest["split"] = "oof"
    oof_dir = out_dir / "predictions" / "oof"
    oof.write(oof_dir)
    report = {"folds": n_folds, "splits": str(out_dir / SPLITS), "fold_runs": [str(d) for d in fold_dirs],
              "per_fold": per_fold, "mean": mean, "std": std,
              "oof": {"predictions": str(oof_dir), "count": len(oof.ids), "scores": None}, "test": {}}
    if scorer is not None:
        report["oof"]["scores"] = _scalars(scorer.score_predictions(read_predictions(oof_dir), "oof"))
    found = main_metric(scorer, mean) if mean else None
    report["main_metric"], report["mode"] = found if found else (None, None)

    available = [set(run_splits(d)) for d in fold_dirs]
    for split in sorted(s for s in set.intersection(*available) if s.startswith("test")):
        folder = out_dir / "predictions" / split
        combine([read_predictions(d / "predictions" / split) for d in fold_dirs]).write(folder)
        scores = _scalars(scorer.score_predictions(read_predictions(folder), split)) if scorer is not None else None
        report["test"][split] = {"predictions": str(folder), "scores": scores}
    return report


def run_cv(cfg, out_dir, console, folds_only: bool = False) -> dict:
    """The whole CV: splits, every fold's training, the summary; writes and returns OUT/cv.json
    (with `folds_only`, only splits.json, and returns its summary)."""
    from podium.engine.runs import write_json

    out_dir = Path(out_dir)
    if cfg.cv.fold is not None:
        raise UserError(f"cv.fold={cfg.cv.fold}: podium cv trains every fold itself; to train one fold "
                        f"use podium train ... cv.fold={cfg.cv.fold}.")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder.")
    splits_path, splits = prepare_splits(cfg, out_dir)
    n = splits["folds"]
    sizes = [len(splits["ids"][str(k)]) for k in range(n)]
    if folds_only:
        return {"splits": str(splits_path), "folds": n, "sizes": sizes, "method": splits.get("method"),
                "group_by": splits.get("group_by")}
    runs = train_folds(cfg, out_dir, console, splits_path, n)
    report = summarise(out_dir, n)
    report["runs"] = runs
    report["sizes"] = sizes
    write_json(out_dir / REPORT, report)
    return report


def report_table(report: dict):
    """A rich table: one row per fold, mean ± std, OOF and each averaged test split."""
    from rich.table import Table

    main = report.get("main_metric")
    names = list(report["mean"])
    names = ([main] if main in names else []) + [n for n in names if n != main][:4]
    title = f"{report['folds']}-fold CV" + (f": {main} ({'higher' if report['mode'] == 'max' else 'lower'} is better)"
                                            if main else "")
    table = Table(title=title)
    table.add_column("")
    table.add_column("samples", justify="right")
    for n in names:
        table.add_column(n, justify="right")

    def cells(scores):
        return [f"{scores[n]:.4f}" if scores and n in scores else "" for n in names]

    for k, scores in enumerate(report["per_fold"]):
        table.add_row(f"fold {k}", str(report["sizes"][k]), *cells(scores))
    table.add_row("[bold]mean ± std[/]", "", *[f"[bold]{report['mean'][n]:.4f} ± {report['std'][n]:.4f}[/]"
                                              for n in names])
    table.add_row("out-of-fold", str(report["oof"]["count"]), *cells(report["oof"]["scores"]))
    for split, entry in report["test"].items():
        table.add_row(f"{split} (fold avg)", "", *cells(entry["scores"]))
    return table
