"""``sharpness train``, ``compare``, ``report``, ``configs`` and ``download``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sharpness.harness.report import label_epochs

__all__ = ["register", "label_epochs"]


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a YAML config file, or the name of a bundled config (see `sharpness configs`)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set rho=0.1 --set epochs=50",
    )
    p.add_argument(
        "--data-dir",
        help="where the data sets are (default: $SHARPNESS_DATA_DIR, then "
        "~/.cache/sharpness/data); the embedded 'digits' set needs none",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download the data set from its official address (checksum verified) if missing",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the config's, 'auto')")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are off anyway when stderr is not a terminal)",
    )


def _load(args: argparse.Namespace, extra: list[str] | None = None):
    from sharpness.harness.config import load_config

    overrides = list(args.overrides) + (extra or [])
    if args.data_dir:
        overrides.append(f"data_dir={args.data_dir}")
    if args.device:
        overrides.append(f"device={args.device}")
    config = load_config(args.config, overrides)
    if args.download:
        from sharpness.harness.data import download_dataset, find_dataset

        if find_dataset(config.dataset, config.data_dir) is None:
            download_dataset(config.dataset, config.data_dir)
    return config


def _progress(args: argparse.Namespace) -> bool | None:
    return False if args.no_progress else None


def _train(args: argparse.Namespace) -> int:
    from sharpness.harness.distributed import is_main_process
    from sharpness.harness.train import train

    extra = [f"seed={args.seed}"] if args.seed is not None else []
    config = _load(args, extra)
    out = Path(args.out or Path("runs") / config.name / f"{config.method}-seed{config.seed}")
    for summary in train(config, out, resume=args.resume, progress=_progress(args)):
        if not is_main_process():  # under torchrun, rank 0 reports for all
            continue
        m = summary["metrics"]
        top5 = f" (top-5 {m['test_top5_error']:.2f}%)" if "test_top5_error" in m else ""
        print(
            f"{summary['experiment']} {summary['method']} seed {summary['seed']}: test error "
            f"{m['test_error']:.2f}%{top5}, train error {m['train_error']:.2f}% ({summary['seconds']:.0f} s) -> {out}"
        )
    return 0


def _rows(summaries: list[dict], args: argparse.Namespace, metric: str | None = None):
    """The report's rows: compute-matched SGD as one best-of-epochs column, the raw ones with --raw."""
    from sharpness.harness.report import aggregate, best_of_epochs

    metric = metric or args.metric
    rows = aggregate(label_epochs(summaries), metric=metric)
    return best_of_epochs(rows, metric=metric, raw=args.raw)


def _tables(summaries: list[dict], rows, args: argparse.Namespace) -> str:
    """The metric's table, then the top-5 error's where every run has one (the paper's Table 2 gives both)."""
    from sharpness.harness.report import companion_metric, markdown_table

    table = markdown_table(rows, metric=args.metric)
    extra = companion_metric(summaries, args.metric)
    if extra is None:
        return table
    return f"{table}\n{extra}:\n\n{markdown_table(_rows(summaries, args, extra), metric=extra)}"


def _compare(args: argparse.Namespace) -> int:
    from sharpness.harness.distributed import is_main_process
    from sharpness.harness.report import collect_summaries, plot_comparison
    from sharpness.harness.train import train

    base = _load(args)
    out = Path(args.out or Path("runs") / base.name)
    variants = [(method, {}) for method in dict.fromkeys(args.methods)]
    if base.label and len(variants) > 1:
        from sharpness.harness.config import ConfigError

        raise ConfigError(f"label {base.label!r} names the runs of one method; give compare one --methods")
    if args.compute_matched and "sgd" in args.methods:
        # twice the run's length, in steps where the config counts steps (Table 3's rows)
        twice = {"train_steps": 2 * base.train_steps} if base.train_steps else {"epochs": 2 * base.epochs}
        variants.append(("sgd", twice))
    for seed in args.seeds:
        for method, change in variants:
            overrides = [f"method={method}", f"seed={seed}"] + [f"{k}={v}" for k, v in change.items()]
            config = _load(args, overrides)
            tag = (base.label or method) + ("-2x" if change else "")
            run_dir = out / f"{tag}-seed{seed}"
            # A finished run is reused and a killed one continued, both only if its config.yaml is this config.
            summary = train(config, run_dir, resume=(run_dir / "config.yaml").exists(), progress=_progress(args))[-1]
            if is_main_process():
                print(f"{tag} seed {seed}: test error {summary['metrics']['test_error']:.2f}%", file=sys.stderr)
    if not is_main_process():  # under torchrun, rank 0 writes the report
        return 0
    summaries = collect_summaries([out])
    rows = _rows(summaries, args)
    table = _tables(summaries, rows, args)
    (out / "report.md").write_text(table + "\n")
    plot_comparison(rows, out / "report.png", metric=args.metric)
    print(table)
    return 0


def _select_rho(args: argparse.Namespace) -> int:
    """The paper's protocol: train SAM for each rho of the grid on 90% of the training set, keep the best on 10%."""
    from sharpness.harness.checkpoint import write_json
    from sharpness.harness.distributed import is_main_process
    from sharpness.harness.train import train

    base = _load(args)
    # Beside compare's runs/<name>, not inside it, and under experiment names of their own, so that reports
    # of runs/ never take a validation run for a seed of the final one.
    out = Path(args.out or Path("runs") / f"{base.name}-select-rho")
    results = []
    for rho in args.grid:
        run_dir = out / f"rho{rho:g}"
        overrides = [
            f"rho={rho}",
            f"val_fraction={args.val_fraction}",
            "eval_on=val",
            "method=sam",
            f"name={base.name}-select-rho-{rho:g}",
        ]
        summary = train(
            _load(args, overrides), run_dir, resume=(run_dir / "config.yaml").exists(), progress=_progress(args)
        )[0]
        results.append({"rho": rho, "val_error": summary["metrics"]["val_error"]})
        print(f"rho {rho:g}: validation error {summary['metrics']['val_error']:.2f}%", file=sys.stderr)
    best = min(results, key=lambda r: r["val_error"])
    if not is_main_process():  # under torchrun, rank 0 writes the selection
        return 0
    write_json(out / "selection.json", {"grid": results, "best_rho": best["rho"], "val_fraction": args.val_fraction})
    print("| rho | validation error (%) |\n|---:|---:|")
    for r in results:
        mark = "**" if r is best else ""
        print(f"| {mark}{r['rho']:g}{mark} | {mark}{r['val_error']:.2f}{mark} |")
    print(f"\nbest rho = {best['rho']:g} (train the final model with --set rho={best['rho']:g})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from sharpness.harness.report import collect_summaries, plot_comparison

    summaries = collect_summaries(args.paths)
    if not summaries:
        raise FileNotFoundError(f"no summary.json under {', '.join(map(str, args.paths))}")
    rows = _rows(summaries, args)
    table = _tables(summaries, rows, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    if args.png:
        plot_comparison(rows, args.png, metric=args.metric)
    return 0


def _configs(args: argparse.Namespace) -> int:
    import yaml

    from sharpness.harness.config import bundled_configs

    configs = bundled_configs()
    width = max(map(len, configs), default=0)
    for name, path in configs.items():
        text = yaml.safe_load(path.read_text()) or {}
        print(
            f"{name:{width}s} {text.get('dataset', '?'):14s} {text.get('model', '?'):24s} "
            f"{text.get('epochs', '?'):>5} epochs  {path.parent.name}"
        )
    return 0


def _download(args: argparse.Namespace) -> int:
    from sharpness.harness.data import download_dataset

    for path in download_dataset(args.dataset, args.data_dir):
        print(path)
    return 0


class _KeysHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Prints multi-line texts (the epilog's one line per config key) as written, and wraps the others."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="test_error", help="metric to report (default: test_error)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="with compute-matched SGD, also show each epoch count's own column beside the best-of column",
    )


def register(sub: argparse._SubParsersAction) -> None:
    from sharpness.harness.config import METHOD_NAMES, keys_help

    config_parser = {"epilog": keys_help(), "formatter_class": _KeysHelpFormatter}
    p = sub.add_parser(
        "train",
        help="train one run of a config",
        description="Train one run. The run "
        "directory gets config.yaml, metrics.jsonl, checkpoint.pt, summary.json, model.pt and "
        "curves.png; it is never overwritten (use --resume to continue a killed run).",
        **config_parser,
    )
    _config_args(p)
    p.add_argument("--out", help="run directory (default: runs/<name>/<method>-seed<seed>)")
    p.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.set_defaults(handler=_train)

    p = sub.add_parser(
        "compare",
        help="SAM beside SGD (and any variants) over seeds, with a report",
        description="Train the config with each method (default: sam and sgd) for each seed (skipping "
        "finished runs, resuming killed ones), then write report.md and report.png.",
        **config_parser,
    )
    _config_args(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["sam", "sgd"],
        choices=METHOD_NAMES,
        metavar="METHOD",
        help=f"methods side by side (default: sam sgd), of: {' '.join(METHOD_NAMES)}",
    )
    p.add_argument(
        "--compute-matched",
        action="store_true",
        help="also train SGD (when among --methods) for twice the epochs (the paper keeps the better SGD run)",
    )
    p.add_argument("--out", help="parent directory of the runs (default: runs/<name>)")
    _report_args(p)
    p.set_defaults(handler=_compare)

    p = sub.add_parser(
        "report",
        help="aggregate runs into mean ± 95%% CI tables",
        description="Collect summary.json files under the given paths and print a Markdown "
        "table: experiments as rows, methods side by side, mean ± 95% CI (Student t) over seeds. Where SGD "
        "ran for two epoch counts (compare --compute-matched), one column 'SGD (best of 1x/2x epochs)' holds "
        "the one with the better mean and says which, as the paper does; --raw also shows both.",
    )
    p.add_argument("paths", nargs="+", help="run directories or folders containing them")
    _report_args(p)
    p.add_argument("--out", help="also write the table to this Markdown file")
    p.add_argument("--png", help="also draw a bar chart with CI error bars to this PNG file")
    p.set_defaults(handler=_report)

    p = sub.add_parser(
        "select-rho",
        help="choose rho on a held-out validation split, as the paper does",
        description="Train SAM once per rho of the grid on (1 - val_fraction) of the training set and report the "
        "validation error of each (the clean test error is recorded beside it); the paper uses the default grid "
        "and 10%.",
        **config_parser,
    )
    _config_args(p)
    p.add_argument(
        "--grid",
        type=float,
        nargs="+",
        default=[0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
        help="rho values (default: 0.01 0.02 0.05 0.1 0.2 0.5)",
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction (default: 0.1)")
    p.add_argument("--out", help="parent directory of the runs (default: runs/<name>-select-rho)")
    p.set_defaults(handler=_select_rho)

    p = sub.add_parser("configs", help="list the bundled experiment configs")
    p.set_defaults(handler=_configs)

    p = sub.add_parser("download", help="download a data set (official address, checksum verified)")
    p.add_argument("dataset", help="cifar10, cifar100, svhn, svhn_extra (train + extra + test), mnist or fashion_mnist")
    p.add_argument("--data-dir", help="target folder (default: $SHARPNESS_DATA_DIR, then ~/.cache/sharpness/data)")
    p.set_defaults(handler=_download)
