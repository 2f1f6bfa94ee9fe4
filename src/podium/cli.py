"""podium's command line: one typer app.

Heavy libraries (torch, lightning, mlflow) are imported inside the commands, so that
`podium --help` answers at once.

Exit codes: 0 success, 2 user error (bad config, bad input), 1 internal failure, 130 interrupted.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="podium: train, evaluate, ensemble and serve image models from configs.\n\n"
    "Example: podium train experiment=digits trainer.max_epochs=3",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
list_app = typer.Typer(help="List registered models, datasets, losses and experiments.", no_args_is_help=True)
app.add_typer(list_app, name="list")


def _console():
    from rich.console import Console

    return Console(stderr=False)


def _error_console():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # never break a file name across lines


def _clean_message(message: str) -> str:
    # Errors raised inside DataLoader workers arrive wrapped with the worker's traceback.
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    from rich.markup import escape

    return escape(message)  # "[width, height]" in a message is text, not rich markup


def handle_errors(fn):
    """Map exceptions to exit codes: UserError → 2 (no traceback), diverged → 1, Ctrl-C → 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from podium.errors import TrainingDiverged, UserError

        try:
            return fn(*args, **kwargs)
        except UserError as err:
            _error_console().print(f"[bold red]error:[/] {_clean_message(str(err))}", highlight=False)
            raise typer.Exit(2)
        except TrainingDiverged as err:
            _error_console().print(f"[bold red]training stopped:[/] {_clean_message(str(err))}", highlight=False)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            raise typer.Exit(130)
        except OSError as err:
            # a full, read-only or forbidden disk is the user's to fix (exit 2), wherever we wrote
            import errno

            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            verb = "write" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) else "access"
            where = f" {err.filename}" if err.filename else ""
            _error_console().print(f"[bold red]error:[/] cannot {verb}{where}: {err.strerror or err}. "
                                   "Free some space or fix the folder's permissions; files already "
                                   "written are intact.", highlight=False)
            raise typer.Exit(2)
        except Exception as err:
            # DataLoader workers re-raise our UserError as a RuntimeError-like copy of it.
            if type(err).__name__ == "UserError" or "podium.errors.UserError" in str(err):
                _error_console().print(f"[bold red]error:[/] {_clean_message(str(err))}", highlight=False)
                raise typer.Exit(2)
            raise

    return wrapper


def _split_resume(overrides: list[str]) -> tuple[Optional[str], str, list[str]]:
    """(resume run, which checkpoint to resume from, the other overrides)."""
    resume, checkpoint, rest = None, "last", []
    for item in overrides:
        if item.startswith("resume="):
            resume = item.split("=", 1)[1] or None
        elif item.startswith("resume_checkpoint="):
            checkpoint = item.split("=", 1)[1]
        else:
            rest.append(item)
    return resume, checkpoint, rest


def _run_config(overrides: Optional[List[str]], default_experiment: Optional[str] = None):
    """(run_dir, resume checkpoint, cfg): the stored config of `resume=RUN` with the overrides a
    resume can honour (others exit 2, see podium.engine.resume), or a new composition (with
    `experiment=default_experiment` unless the overrides name one)."""
    from podium.config import compose, load_run_config
    from podium.engine.resume import check_resume_overrides
    from podium.engine.runs import existing_run_dir
    from podium.errors import UserError

    resume, checkpoint, rest = _split_resume(overrides or [])
    if resume:
        from podium.engine.mirror import resolve_resume

        # resume=MIRROR_URL, or a run folder that is gone but mirrored: fetched back first
        run_dir = existing_run_dir(resolve_resume(resume, _console()))
        cfg = load_run_config(run_dir, rest)
        changes = check_resume_overrides(run_dir, load_run_config(run_dir, []), cfg)
        for key, (before, after) in changes.items():
            _console().print(f"resume: {key} {before} -> {after}", highlight=False)
        return run_dir, checkpoint, cfg
    if checkpoint != "last":
        raise UserError("resume_checkpoint= is only meaningful with resume=RUN.")
    if default_experiment and not any(o.lstrip("+~").startswith("experiment=") for o in rest):
        rest = [f"experiment={default_experiment}", *rest]
    return None, "last", compose(rest)


def _final_title(cfg, out_dir: Path) -> str:
    which = "best checkpoint" if (out_dir / "checkpoints" / "best.pt").is_file() else "last weights: no best.pt"
    return f"{cfg.name}: final metrics ({which})"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def train(
    overrides: List[str] = typer.Argument(None, help="Hydra overrides, e.g. optim.lr=3e-4"),
    show_config: bool = typer.Option(False, "--cfg", help="Print the composed config and exit."),
):
    """Train a model from configs.

    Example: podium train experiment=digits trainer.max_epochs=3 optim.lr=3e-4 run.dir=runs/x

    Continue an interrupted run: podium train resume=runs/x

    Train a finished run on to 20 epochs: podium train resume=runs/x trainer.max_epochs=20
    (keys that would contradict the saved state, such as optim.lr, are refused; a damaged
    last.pt can be passed over with resume_checkpoint=best)

    Two CPU processes (DDP): podium train experiment=digits trainer.devices=2 trainer.accelerator=cpu

    Hydra multirun, a grid sweep (see `podium sweep`): podium train experiment=digits optim.lr=1e-3,3e-4 -m
    """
    from omegaconf import OmegaConf

    from podium.engine import session

    console = _console()
    if any(o in ("-m", "--multirun") for o in overrides or []):
        return _print_sweep(console, overrides)
    run_dir, resume_checkpoint, cfg = _run_config(overrides)
    if show_config:
        console.print(OmegaConf.to_yaml(cfg), highlight=False)
        return
    out_dir, metrics = session.train(cfg, console, resume_dir=run_dir, resume_checkpoint=resume_checkpoint)
    if _is_rank_zero():
        console.print(session.metrics_table(metrics, _final_title(cfg, out_dir)))
        console.print(f"run folder: {out_dir}\nmetrics:    {out_dir / 'metrics.json'}\n"
                      f"MLflow UI:  podium ui --root {cfg.run.root}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def pretrain(
    overrides: List[str] = typer.Argument(None, help="Hydra overrides, e.g. data.root=DIR task.method=simclr"),
    show_config: bool = typer.Option(False, "--cfg", help="Print the composed config and exit."),
):
    """Pretrain a segmentation encoder on unlabelled images (MoCo v2, or task.method=simclr)
    and write RUN_DIR/encoder.pt for `model.encoder_weights`.

    `podium train` with task=moco; without experiment=..., experiment=drive_moco is used.

    Example: podium pretrain experiment=moco_synthetic trainer.max_epochs=2

    Own images: podium pretrain data.root=DIR 'data.patterns=[*.png]' model.backbone=resnet34

    Continue an interrupted run: podium pretrain resume=runs/x
    """
    from omegaconf import OmegaConf

    from podium.engine import session
    from podium.errors import UserError
    from podium.tasks.segmentation.pretrain import export_encoder

    console = _console()
    run_dir, resume_checkpoint, cfg = _run_config(overrides, default_experiment="drive_moco")
    if cfg.task.name != "moco":
        raise UserError(f"podium pretrain runs task=moco (self-supervised pretraining), got "
                        f"task={cfg.task.name}; use `podium train` for supervised tasks.")
    if show_config:
        console.print(OmegaConf.to_yaml(cfg), highlight=False)
        return
    out_dir, metrics = session.train(cfg, console, resume_dir=run_dir, resume_checkpoint=resume_checkpoint)
    if _is_rank_zero():
        path = export_encoder(out_dir, cfg.task.export_checkpoint)
        console.print(session.metrics_table(metrics, _final_title(cfg, out_dir)))
        console.print(f"run folder: {out_dir}\nencoder ({cfg.model.backbone}, "
                      f"{cfg.task.export_checkpoint} checkpoint): {path}\n"
                      f"use it:     podium train ... model.encoder={cfg.model.backbone} "
                      f"model.encoder_weights={path}", highlight=False, soft_wrap=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def augment(
    overrides: List[str] = typer.Argument(None, help="Hydra overrides naming the data and its data.augment."),
    n: int = typer.Option(..., "--n", help="Augmented training images to write."),
    out: Path = typer.Option(..., "--out", help="New dataset folder (with --preview: a .png grid)."),
    workers: int = typer.Option(2, help="Loader worker processes that augment and encode in parallel."),
    preview: bool = typer.Option(False, "--preview", help="Only save a grid PNG of the first --n (at most 64)."),
):
    """Materialise an augmented training set as an image folder, with a manifest.

    Example: podium augment experiment=digits '+data.augment=[{name: Corrupt, p: 0.8}]' --n 80000 --out aug/

    Then: podium train experiment=digits data=image_folder data.root=aug/ data.image_size=32
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from podium.config import compose
    from podium.toolkit.augment import materialise

    console = _console()
    cfg = compose(overrides or [])
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        manifest = materialise(cfg, n, out, workers=workers, preview=preview, progress=progress)
    if preview:
        console.print(f"preview grid: {manifest['preview']}")
        return
    console.print(f"written: {out}  ({n} augmented training images from {manifest['sources']['train']}; "
                  f"splits {', '.join(manifest['sources'])})\nmanifest: {out / 'manifest.json'}\n"
                  f"train on it: {manifest['use']}", highlight=False, soft_wrap=True)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def sweep(
    overrides: List[str] = typer.Argument(None, help="Hydra overrides with sweep.space=..., or comma lists for a grid."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="A sweep folder whose study to continue."),
):
    """Search hyperparameters with Optuna (TPE, median pruning); one run folder per trial.

    Example: podium sweep experiment=digits sweep.trials=16
    'sweep.space={optim.lr: {type: float, low: 1e-4, high: 1e-2, log: true}, model.width: {type: int, low: 8, high: 32}}'

    Grid: podium sweep experiment=digits optim.lr=1e-3,3e-4 model.width=8,16

    Workers on several machines: the same command on each, with
    sweep.storage=postgresql://USER@HOST/DB sweep.study=NAME

    Continue (run the trials still missing): podium sweep --resume runs/...-sweep [sweep.trials=32]
    """
    _print_sweep(_console(), overrides or [], resume)


def _print_sweep(console, overrides: list[str], resume: Optional[Path] = None) -> None:
    from podium.toolkit.sweep import results_table, run_sweep

    summary = run_sweep(list(overrides), console, resume=resume)
    console.print(results_table(summary))
    best = summary["best"]
    if best:
        console.print(f"best: trial {best['number']} {summary['metric']}={best['value']:.4f} {best['params']}\n"
                      f"      {best['run_dir']}", highlight=False, soft_wrap=True)
    console.print(f"sweep folder: {summary['dir']}\nresults:      {Path(summary['dir']) / 'sweep.json'}\n"
                  f"trials here:  {len(summary['trials_run_here'])} of {len(summary['trials'])} in the study",
                  highlight=False, soft_wrap=True)


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


@app.command(name="eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def eval_(
    run_dir: Path = typer.Argument(..., help="A run folder made by `podium train`."),
    overrides: List[str] = typer.Argument(None, help="Overrides of the run's config, e.g. data.root=..."),
    checkpoint: str = typer.Option("best", help="best | last | a path to a .pt file"),
    split: List[str] = typer.Option(None, "--split", help="Splits to evaluate (default: val and every test split)."),
    out: Optional[Path] = typer.Option(None, help="JSON file for the metrics (default RUN_DIR/eval/<ckpt>[-<overrides hash>]/metrics.json)."),
):
    """Evaluate a run with its own config and preprocessing.

    Predictions and plots go to RUN_DIR/eval/<ckpt>[-<overrides hash>]/, never over the
    training-time predictions/ that ensembles read.

    Example: podium eval runs/20261124-101500-digits --split test_corrupted
    """
    from podium.engine import session
    from podium.engine.runs import existing_run_dir

    console = _console()
    metrics, path = session.evaluate(existing_run_dir(run_dir), overrides or [], console, checkpoint,
                                     split or None, out)
    console.print(session.metrics_table(metrics, f"{run_dir}: {checkpoint} checkpoint"))
    console.print(f"written: {path}")


@app.command()
@handle_errors
def predict(
    run_dir: Path = typer.Argument(..., help="A run folder made by `podium train`."),
    inputs: List[Path] = typer.Argument(..., help="Input files or folders."),
    out: Path = typer.Option(..., "--out", help="Output file (CSV for classification)."),
    checkpoint: str = typer.Option("best", help="best | last | a path to a .pt file"),
    override: List[str] = typer.Option(None, "--override", "-o",
                                       help="Override of the run's config, e.g. task.adapt.steps=60 (repeatable)."),
):
    """Predict on raw files with the run's own preprocessing.

    Example: podium predict runs/20261124-101500-digits images/ --out predictions.csv
    """
    from podium.engine import session
    from podium.engine.runs import existing_run_dir
    from podium.errors import UserError

    run_dir = existing_run_dir(run_dir)
    # Checked before the model loads: every task writes one file (a table, or .h5 for MRI).
    if out.is_dir():
        raise UserError(f"--out {out} is an existing folder; --out must be a file path, e.g. "
                        f"--out {out / 'predictions.csv'} (.h5 for reconstruction).")
    blocking = next((p for p in [out.parent, *out.parent.parents] if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UserError(f"--out {out}: {blocking} is a file, not a folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    path = session.predict(run_dir, inputs, out, _console(), checkpoint, override or [])
    _console().print(f"written: {path}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@handle_errors
def cv(
    overrides: List[str] = typer.Argument(None, help="Hydra overrides with cv.folds=N (or cv.splits=FILE)."),
    out: Path = typer.Option(..., "--out", help="CV folder: splits.json, fold_<k>/ runs, predictions/oof, cv.json."),
    folds_only: bool = typer.Option(False, "--folds-only", "--dry-run", help="Only write OUT/splits.json."),
):
    """k-fold cross-validation: stratified (grouped with cv.group_by) folds of the train and val
    splits, one run per fold, out-of-fold predictions, scores per fold and mean ± std.

    Example: podium cv experiment=digits cv.folds=5 --out runs/cv-digits

    Same folds for another model: podium cv experiment=digits model=timm
    cv.splits=runs/cv-digits/splits.json --out runs/cv-timm (a rerun skips finished folds)
    """
    from podium.config import compose
    from podium.toolkit.cv import report_table, run_cv

    console = _console()
    report = run_cv(compose(overrides or []), out, console, folds_only=folds_only)
    if folds_only:
        console.print(f"written: {report['splits']}  ({report['folds']} folds of {', '.join(map(str, report['sizes']))} "
                      f"samples, {report['method']})", highlight=False, soft_wrap=True)
        return
    console.print(report_table(report))
    console.print(f"out-of-fold predictions: {report['oof']['predictions']}\nwritten: {Path(out) / 'cv.json'}",
                  highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def ensemble(
    paths: List[Path] = typer.Argument(..., help="Run folders (their saved predictions), or classification CSVs."),
    out: Path = typer.Option(..., "--out", help="Folder for run ensembles (predictions/ + ensemble.json); a .csv file for CSVs."),
    weights: Optional[str] = typer.Option(None, "--weights", help="One weight per member, e.g. 1,2 (normalised)."),
    how: str = typer.Option("mean", "--how", help="mean | geometric (runs only)."),
    split: List[str] = typer.Option(None, "--split", help="Splits to ensemble (default: every split all runs saved)."),
    search: Optional[str] = typer.Option(None, "--search", help="oof: fit the weights on the members' out-of-fold "
                                         "predictions (podium cv folders), apply them to the other splits."),
):
    """Average the saved predictions of several runs (or classification CSVs) and score the result.

    Example: podium ensemble runs/a runs/b --out runs/ens --weights 2,1
    Example: podium ensemble runs/cv_a runs/cv_b --out runs/ens --search oof
    """
    from rich.table import Table

    from podium.errors import UserError
    from podium.toolkit.ensemble import ensemble_csvs, ensemble_runs

    parsed = None
    if weights:
        try:
            parsed = [float(x) for x in weights.split(",")]
        except ValueError:
            raise UserError(f"--weights {weights!r}: expected comma-separated numbers, e.g. 1,2.") from None
    is_csv = [p.suffix.lower() == ".csv" for p in paths]
    console = _console()
    if any(is_csv):
        if not all(is_csv):
            raise UserError("give either run folders or .csv files, not both: "
                            f"{', '.join(str(p) for p, c in zip(paths, is_csv) if not c)} "
                            f"vs {', '.join(str(p) for p, c in zip(paths, is_csv) if c)}.")
        if how != "mean" or split or search:
            raise UserError("--how, --split and --search apply to run folders; CSVs are averaged (or voted) by id.")
        report = ensemble_csvs(paths, out, parsed)
        table = Table(title=f"{report['how']} of {len(paths)} CSVs, {report['rows']} rows")
        table.add_column("member")
        table.add_column("weight", justify="right")
        table.add_column("agrees with ensemble", justify="right")
        for member, w in zip(report["members"], report["weights"]):
            table.add_row(member, f"{w:.3f}", f"{report['agreement'][member]:.3f}")
        console.print(table)
        console.print(f"written: {out}", highlight=False, soft_wrap=True)
        return
    if how not in ("mean", "geometric"):
        raise UserError(f"--how {how!r}: expected mean or geometric.")
    report = ensemble_runs(paths, out, parsed, how, split or None, search)
    if "search" in report:
        _print_weight_search(console, report["search"])
    for name, entry in report["splits"].items():
        metric = entry.get("main_metric")
        if not entry["ensemble"] or metric is None:
            console.print(f"{name}: combined ({entry['kind']}); the task does not score saved predictions.")
            continue
        table = Table(title=f"{name}: {metric} ({'higher' if entry['mode'] == 'max' else 'lower'} is better)")
        table.add_column("member")
        table.add_column("weight", justify="right")
        table.add_column(metric, justify="right")
        for (member, scores), w in zip(entry["members"].items(), report["weights"]):
            table.add_row(member, f"{w:.3f}", f"{scores.get(metric, float('nan')):.4f}")
        table.add_row("[bold]ensemble[/]", "", f"[bold]{entry['ensemble'][metric]:.4f}[/]")
        if "gain" in entry:
            table.add_row("gain over best member", "", f"{entry['gain']:+.4f}")
        console.print(table)
    console.print(f"written: {Path(out) / 'ensemble.json'}", highlight=False, soft_wrap=True)


def _print_weight_search(console, search: dict) -> None:
    """The weights `ensemble --search oof` fitted, and the OOF scores of equal vs searched weights."""
    from rich.table import Table

    scores = [k for k in search["searched"] if k in search["equal"]]
    table = Table(title=f"weights fitted on out-of-fold predictions only ({search['count']} samples): {search['method']}")
    table.add_column("member")
    table.add_column("searched weight", justify="right")
    for name in scores:
        table.add_column(f"OOF {name}", justify="right")
    for (member, member_scores), w in zip(search["members"].items(), search["weights"]):
        table.add_row(member, f"{w:.3f}", *[f"{member_scores.get(n, float('nan')):.4f}" for n in scores])
    table.add_row("equal weights", "", *[f"{search['equal'][n]:.4f}" for n in scores])
    table.add_row("[bold]searched weights[/]", "", *[f"[bold]{search['searched'][n]:.4f}[/]" for n in scores])
    console.print(table)


@app.command()
@handle_errors
def diff(
    a: Path = typer.Argument(..., help="Run folder or classification CSV (id,label[,prob_*])."),
    b: Path = typer.Argument(..., help="Run folder or classification CSV to compare with A."),
    out: Path = typer.Option(..., "--out", help="Folder for diff.json and diff.png."),
    split: Optional[str] = typer.Option(None, "--split", help="Saved split of the runs (default: the first common test split)."),
    top: int = typer.Option(20, "--top", min=1, help="Rows shown in the table."),
):
    """Where two models disagree, sample by id: a table, the confusion between them, a PNG grid.

    Example: podium diff runs/a runs/b --split test_corrupted --out runs/diff_ab
    """
    from rich.table import Table

    from podium.toolkit.diff import diff as run_diff

    console = _console()
    report = run_diff(a, b, out, split, top)
    where = f" on {report['split']}" if report.get("split") else ""
    if report["kind"] == "class_probs":
        table = Table(title=f"{report['disagreements']} of {report['count']} samples differ{where} "
                            f"(agreement {report['agreement']:.3f})")
        for col in ("id", "A", "B", "truth", "A conf.", "B conf."):
            table.add_column(col, justify="right" if "conf" in col else "left")
        for r in report["rows"][:top]:
            table.add_row(r["id"], r["a"], r["b"], r["truth"] if r["truth"] is not None else "-",
                          *["-" if c is None else f"{c:.3f}" for c in (r["a_confidence"], r["b_confidence"])])
        console.print(table)
        confusion = Table(title="confusion: A's labels (rows) vs B's labels (columns)")
        confusion.add_column("A \\ B")
        labels = report["confusion"]["labels"]
        for label in labels:
            confusion.add_column(label, justify="right")
        for label, row in zip(labels, report["confusion"]["matrix"]):
            confusion.add_row(label, *[str(v) for v in row])
        console.print(confusion)
        if "right_on_disagreements" in report:
            right, acc = report["right_on_disagreements"], report["accuracy"]
            console.print(f"on the disagreements A is right {right['a']}, B {right['b']}, neither {right['neither']}; "
                          f"accuracy A {acc['a']:.4f}, B {acc['b']:.4f}")
    else:
        metric = report["metric"]
        table = Table(title=f"{report['kind']}{where}: the {min(top, report['count'])} samples that differ most "
                            f"(mean {metric} {report['mean']:.4f})")
        table.add_column("id")
        for key in [k for k in (report["top"][0] if report["top"] else {}) if k != "id"]:
            table.add_column(key, justify="right")
        for r in report["top"]:
            table.add_row(r["id"], *[f"{v:.4f}" for k, v in r.items() if k != "id"])
        console.print(table)
    if report["grid_skipped"]:
        console.print(f"[yellow]no image grid: {report['grid_skipped']}[/]", highlight=False, soft_wrap=True)
    written = [str(Path(out) / "diff.json"), *([report["grid"]] if report["grid"] else [])]
    console.print(f"written: {', '.join(written)}", highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def audit(
    run_dir: Path = typer.Argument(..., help="A `podium cv` folder (out-of-fold probabilities) or a run folder."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for audit.json/csv/png (default RUN_DIR/audit)."),
    top: int = typer.Option(20, "--top", min=1, help="Flagged samples shown (and kept in audit.json)."),
    split: Optional[str] = typer.Option(None, "--split", help="Saved split to audit (default: oof, else val)."),
):
    """The samples most likely mislabelled (cleanlab confident learning on saved probabilities).

    Example: podium audit runs/cv-digits --top 30
    """
    from rich.table import Table

    from podium.toolkit.audit import audit as run_audit

    console = _console()
    report = run_audit(run_dir, out, top, split)
    for warning in report["warnings"]:
        console.print(f"[yellow]warning: {warning}[/]", highlight=False, soft_wrap=True)
    table = Table(title=f"{report['issues']} likely label issues of {report['count']} samples ({report['split']}), "
                        f"worst first")
    for col in ("rank", "id", "given", "suggested", "quality"):
        table.add_column(col, justify="right" if col in ("rank", "quality") else "left")
    for r in report["top"]:
        table.add_row(str(r["rank"]), r["id"], r["given"], r["suggested"], f"{r['quality']:.3f}")
    console.print(table)
    if report["grid_skipped"]:
        console.print(f"[yellow]no image grid: {report['grid_skipped']}[/]", highlight=False, soft_wrap=True)
    out_dir = Path(report["csv"]).parent
    written = [str(out_dir / "audit.json"), report["csv"], *([report["grid"]] if report["grid"] else [])]
    console.print(f"written: {', '.join(written)}", highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def export(
    run_dir: Path = typer.Argument(..., help="A run folder made by `podium train`."),
    format: str = typer.Option("onnx", "--format", help="onnx | torchscript | triton"),
    out: Path = typer.Option(..., "--out", help="Output folder (triton: the model repository)."),
    checkpoint: str = typer.Option("best", help="best | last"),
    opset: int = typer.Option(17, help="ONNX opset."),
    max_batch_size: int = typer.Option(8, help="triton: max_batch_size."),
    max_queue_delay_us: int = typer.Option(5000, help="triton: dynamic_batching max_queue_delay_microseconds."),
    instances: int = typer.Option(1, help="triton: instance_group count."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing export."),
    override: List[str] = typer.Option(None, "--override", "-o",
                                       help="Override of the run's config, e.g. tta=flips (repeatable)."),
):
    """Export a run's model with its pre/post-processing spec (preprocess.json).

    Example: podium export runs/20261124-101500-digits --format triton --out model_repository
    """
    from podium.engine.runs import existing_run_dir
    from podium.serve.export import export_run

    console = _console()
    path = export_run(existing_run_dir(run_dir), format, out, checkpoint=checkpoint, opset=opset,
                      max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                      instances=instances, overwrite=overwrite, console=console, overrides=override or [])
    console.print(f"exported ({format}): {path}")


@app.command()
@handle_errors
def serve(
    run_dir: Path = typer.Argument(..., help="A run folder made by `podium train`."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime | torch"),
    max_batch_size: int = typer.Option(8, help="Dynamic batching: largest batch (1 turns it off)."),
    batch_timeout: float = typer.Option(0.01, help="Seconds a batch waits to fill."),
    host: str = typer.Option("127.0.0.1", help="127.0.0.1 (loopback, default) | 0.0.0.0 | ::"),
    port: int = typer.Option(8000, help="TCP port."),
    max_request_mb: float = typer.Option(10.0, help="Largest request body, MiB."),
    checkpoint: str = typer.Option("best", help="best | last | a path to a .pt file"),
    threads: Optional[int] = typer.Option(None, help="Intra-op threads of the backend."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels",
                                             help="Largest image accepted, in pixels, checked before decoding "
                                                  "(default: 64x the model's input area, at least 4 M)."),
    override: List[str] = typer.Option(None, "--override", "-o",
                                       help="Override of the run's config, e.g. tta=flips (repeatable)."),
    engine: str = typer.Option("litserve", "--engine",
                               help="litserve | triton (RUN_DIR or a `podium export --format triton` folder; "
                                    "KServe v2 on /v2/...; its own venv is created on first use)"),
):
    """Serve a run over HTTP (LitServe): POST /predict with an image, GET /health, GET /info.

    Example: podium serve runs/20261124-101500-digits --max-batch-size 8 --port 8000
    Triton:  podium serve runs/20261124-101500-digits --engine triton --port 8000
    """
    if engine == "triton":  # podium.serve.triton: --max-batch-size, --checkpoint, -o go to the export
        from podium.serve.triton import serve as serve_triton

        serve_triton(run_dir, host=host, port=port, console=_console(),
                     export_options={"checkpoint": checkpoint, "max_batch_size": max_batch_size,
                                     "overrides": override or []})
        return
    if engine != "litserve":
        from podium.errors import UserError

        raise UserError(f"unknown --engine {engine!r}; choose litserve or triton.")
    from podium.engine.runs import existing_run_dir
    from podium.serve.server import ServeConfig
    from podium.serve.server import serve as run_server

    config = ServeConfig(backend=backend, max_batch_size=max_batch_size, batch_timeout=batch_timeout,
                         host=host, port=port, max_request_bytes=int(max_request_mb * 2**20),
                         checkpoint=checkpoint, threads=threads, max_pixels=max_pixels,
                         overrides=tuple(override or ()))
    run_server(existing_run_dir(run_dir), config)


@app.command()
@handle_errors
def doctor(
    overrides: List[str] = typer.Argument(None, help="Config overrides naming the dataset to time."),
    batches: int = typer.Option(20, help="Batches to time per num_workers value."),
    no_loader: bool = typer.Option(False, "--no-loader", help="Skip the data-loader timing."),
):
    """Check the torch build and GPUs, time the data loader, check data paths.

    Example: podium doctor experiment=digits
    """
    from podium.engine import doctor as doc

    console = _console()
    report = doc.torch_build_report()
    problems = doc.gpu_build_problems(report, doc.nvidia_smi_gpus())
    rows, recommendation = [], None
    if overrides or not no_loader:
        from omegaconf import OmegaConf

        from podium.config import compose
        from podium.engine import registry
        from podium.engine.loading import make_loader

        cfg = compose(overrides or [])
        problems += doc.check_paths(OmegaConf.to_container(cfg.data))
        if not no_loader and not any("does not exist" in p for p in problems):
            task = registry.build("task", cfg.task.name, cfg)
            train_set = task.build_datasets()["train"]

            def build(workers: int):
                return make_loader(train_set, train=True, batch_size=cfg.trainer.batch_size, seed=cfg.seed,
                                   num_workers=workers, collate_fn=task.collate_fn(), persistent_workers=False)

            rows = doc.time_loader(build, doc.default_worker_counts(report.get("cpu_count") or 1), batches)
            recommendation = doc.recommend_workers(rows)
    doc.render_report(report, problems, rows, recommendation, console)
    if any(p.lower().startswith("error") or "does not exist" in p for p in problems):
        raise typer.Exit(2)


@app.command()
@handle_errors
def runs(
    root: Path = typer.Option(Path("runs"), help="Folder holding run folders."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="List the runs of an MLflow tracking server (http://HOST:PORT) instead of --root."),
    experiment: Optional[str] = typer.Option(None, help="With --tracking-uri: only this experiment's runs."),
):
    """List runs with their key metrics.

    Example: podium runs --root runs --json
    Example: podium runs --tracking-uri http://127.0.0.1:5000
    """
    from rich.table import Table

    from podium.engine.runs import find_runs, run_summary

    if tracking_uri:  # a team server: the same table, read from MLflow instead of run folders
        from podium.common.redact import redact_text
        from podium.engine.tracking_server import list_tracked_runs

        summaries = list_tracked_runs(tracking_uri, experiment=experiment)
        root = redact_text(tracking_uri)
    else:
        summaries = [run_summary(p) for p in find_runs(root)]
    for s in summaries:  # on stderr, so that --json output stays parseable
        if "problem" in s:
            _error_console().print(f"[yellow]warning:[/] {s['problem']}; its metrics are not shown.", highlight=False)
    if as_json:
        typer.echo(json.dumps(summaries, indent=2))
        return
    table = Table(title=f"runs under {root}")
    for col in ("run", "status", "key metrics"):
        table.add_column(col)
    for s in summaries:
        key = {k: v for k, v in s["metrics"].items() if k.count("/") == 1 and not k.startswith("train/")}
        shown = "  ".join(f"{k} {v:.4f}" for k, v in list(key.items())[:6] if isinstance(v, (int, float)))
        table.add_row(s["run"], s["status"], shown)
    _console().print(table)


@app.command()
@handle_errors
def ui(
    root: Path = typer.Option(Path("runs"), help="Folder holding run folders and mlflow.db."),
    port: int = typer.Option(5000, help="Port on 127.0.0.1."),
):
    """Open the MLflow UI on the embedded store (bound to 127.0.0.1).

    Example: podium ui --root runs --port 5000
    """
    import subprocess

    from podium.engine.tracking import ui_command

    cmd = ui_command(root, host="127.0.0.1", port=port)
    _console().print(f"MLflow UI on http://127.0.0.1:{port}  (Ctrl-C to stop)")
    raise typer.Exit(subprocess.call(cmd))


@app.command(name="tracking-server")
@handle_errors
def tracking_server(
    backend_store_uri: str = typer.Option(
        ..., "--backend-store-uri", envvar="MLFLOW_BACKEND_STORE_URI",
        help="Database for runs and metrics, e.g. postgresql://USER:PASSWORD@HOST/DB (or set "
        "MLFLOW_BACKEND_STORE_URI, which keeps the password out of the process list)."),
    artifacts_root: str = typer.Option(
        ..., "--artifacts-root", help="Folder (or s3://, gs:// URL) where the server stores the artifacts it proxies."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; anything but loopback is reachable from the network."),
    port: int = typer.Option(5000, help="Port to listen on."),
    workers: Optional[int] = typer.Option(None, help="Server worker processes (MLflow's default: 4)."),
):
    """Start a team MLflow tracking server on a SQL database; Ctrl-C or SIGTERM stops it.

    Example: podium tracking-server --backend-store-uri postgresql://podium@db/mlflow --artifacts-root /srv/mlartifacts
    """
    import signal

    from podium.engine.tracking_server import network_warning, start_tracking_server

    warning = network_warning(host)
    if warning:
        _error_console().print(f"[yellow]warning:[/] {warning}", highlight=False)

    def _terminate(signum, frame):  # SIGTERM (systemd, docker stop) ends it like Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        server = start_tracking_server(backend_store_uri, artifacts_root, host=host, port=port, workers=workers)
        try:
            _console().print(f"MLflow tracking server ready on {server.uri}  (Ctrl-C to stop)\n"
                             f"log runs to it with: tracking.uri={server.uri}", highlight=False)
            code = server.wait()
        except KeyboardInterrupt:
            code = 0
            _console().print("stopping the tracking server")
        finally:
            server.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 0:
        _error_console().print(f"[bold red]error:[/] the MLflow server exited with code {code}", highlight=False)
        raise typer.Exit(1)


def _list(kind: str, pattern: str):
    from rich.markup import escape
    from rich.table import Table

    from podium.engine import registry

    table = Table(title={"loss": "losses"}.get(kind, f"{kind}s"))
    table.add_column("name")
    table.add_column("description")
    for entry in registry.entries(kind):
        if pattern == "*" or __import__("fnmatch").fnmatch(entry.name, pattern):
            table.add_row(entry.name, escape(entry.help))  # docstrings may hold [brackets]
    _console().print(table)


@list_app.command("models")
def list_models(pattern: str = typer.Argument("*", help="Glob, e.g. 'var*'.")):
    """Registered models (model.name=...). `model=timm model.arch=NAME` takes any timm model."""
    _list("model", pattern)


@list_app.command("datasets")
def list_datasets(pattern: str = typer.Argument("*")):
    """Registered datasets (data.name=...)."""
    _list("dataset", pattern)


@list_app.command("losses")
def list_losses(pattern: str = typer.Argument("*")):
    """Registered losses (loss.name=...)."""
    _list("loss", pattern)


@list_app.command("experiments")
def list_experiments():
    """Experiment configs (podium train experiment=NAME)."""
    from podium.config import group_options

    for name in group_options("experiment"):
        typer.echo(name)


def main():
    app()


if __name__ == "__main__":
    main()
