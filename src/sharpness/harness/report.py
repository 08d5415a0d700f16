"""Aggregate runs over seeds into the SAM paper's tables and plots.

Every run directory holds a ``summary.json``::

    {"experiment": "cifar10_wrn28-10", "method": "sam", "seed": 0,
     "metrics": {"test_error": 2.7, "test_loss": 0.1, "train_error": 0.0, ...}, "config": {...}}

and a ``metrics.jsonl`` with one object per epoch (``epoch, train_loss, train_error, test_loss,
test_error, lr, seconds``). Errors are in percent. :func:`collect_summaries` finds and checks the
summaries, :func:`aggregate` turns them into one :class:`Row` per (experiment, method) with a Student-t
confidence interval over seeds, and :func:`markdown_table` / :func:`plot_comparison` lay the rows out
as the paper does: experiments down, methods (SGD, SAM) across. Where SGD also ran for twice the epochs
(``compare --compute-matched``), :func:`label_epochs` names each epoch count apart and
:func:`best_of_epochs` keeps the better of the two in one SGD column, as the paper does (§3.1). Plots render
with matplotlib's Agg canvas directly, so no display and no global backend switch are involved.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

__all__ = [
    "Row",
    "aggregate",
    "best_of_epochs",
    "label_epochs",
    "collect_summaries",
    "companion_metric",
    "markdown_table",
    "mean_ci",
    "plot_comparison",
    "plot_curves",
]

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
# Column order of the tables: the paper's baseline first, then SAM, then anything else alphabetically.
_METHOD_ORDER = ("sgd", "sam")


@dataclass(frozen=True)
class Row:
    """One (experiment, method) cell: ``values`` of a metric over ``seeds``, their mean and CI half-width."""

    experiment: str
    method: str
    n: int
    mean: float
    ci: float
    values: tuple[float, ...]
    seeds: tuple[int, ...]
    note: str = ""  # e.g. "2x: 400 ep" for a best-of-epochs row
    best_of: str = ""  # e.g. "1x/2x epochs": what a best-of-epochs row chose among


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the two-sided Student-t confidence interval (n - 1 degrees of freedom).

    The half-width is ``t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation; it is NaN for a single value.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty sequence of numbers, got {values!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan
    t = stats.t.ppf((1 + confidence) / 2, x.size - 1)
    return mean, float(t * x.std(ddof=1) / math.sqrt(x.size))


def _summary_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.is_file():
            found = [path]
        elif (path / SUMMARY_FILE).is_file():
            found = [path / SUMMARY_FILE]
        elif path.is_dir():
            found = sorted(path.rglob(SUMMARY_FILE))
        else:
            raise FileNotFoundError(f"no such run directory or file: {path}")
        for file in found:
            if file.resolve() not in seen:
                seen.add(file.resolve())
                files.append(file)
    return files


def _load_summary(file: Path) -> dict:
    try:
        summary = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(summary, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(summary).__name__}")
    expected = {"experiment": str, "method": str, "seed": int, "metrics": dict}
    for key, kind in expected.items():
        if key not in summary:
            raise ValueError(f"{file}: missing key {key!r}")
        if not isinstance(summary[key], kind) or isinstance(summary[key], bool):
            raise ValueError(f"{file}: {key!r} must be {kind.__name__}, got {summary[key]!r}")
    for name, value in summary["metrics"].items():
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise ValueError(f"{file}: metric {name!r} must be a number, got {value!r}")
    summary["run_dir"] = str(file.parent)
    return summary


def collect_summaries(paths: Sequence[str | Path]) -> list[dict]:
    """Load and check the ``summary.json`` of each run.

    Each path is a ``summary.json``, a run directory holding one, or a parent directory searched
    recursively. Every summary gains ``"run_dir"``; a file reached twice is read once. A malformed
    summary raises ``ValueError`` naming the file.
    """
    return [_load_summary(file) for file in _summary_files(paths)]


def companion_metric(summaries: Sequence[dict], metric: str) -> str | None:
    """The metric a report shows beside ``metric``: the top-5 error beside the (top-1) ``test_error`` where every
    run recorded one (image-folder runs, ``top5: true``), as the SAM paper's Table 2 gives both; else None."""
    if metric != "test_error" or not summaries:
        return None
    extra = "test_top5_error"
    return extra if all(s["metrics"].get(extra) is not None for s in summaries) else None


def _method_key(method: str) -> tuple[int, str]:
    return (_METHOD_ORDER.index(method), "") if method in _METHOD_ORDER else (len(_METHOD_ORDER), method)


def aggregate(summaries: Iterable[dict], metric: str = "test_error") -> list[Row]:
    """One :class:`Row` per (experiment, method) with a 95% CI, sorted by experiment, then SGD, SAM, others.

    Raises ``ValueError`` when a run lacks ``metric`` or a seed occurs twice for one (experiment, method).
    """
    groups: dict[tuple[str, str], dict[int, float]] = {}
    for s in summaries:
        where = s.get("run_dir", f"{s['experiment']}/{s['method']}/seed {s['seed']}")
        value = s["metrics"].get(metric)
        if value is None:
            raise ValueError(f"{where}: no metric {metric!r} (has {sorted(s['metrics'])})")
        seeds = groups.setdefault((s["experiment"], s["method"]), {})
        if s["seed"] in seeds:
            raise ValueError(f"{where}: seed {s['seed']} of {s['experiment']}/{s['method']} occurs twice")
        seeds[s["seed"]] = float(value)
    rows = []
    for (experiment, method), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][0], _method_key(kv[0][1]))):
        seeds = tuple(sorted(by_seed))
        values = tuple(by_seed[seed] for seed in seeds)
        mean, ci = mean_ci(values)
        rows.append(Row(experiment, method, len(values), mean, ci, values, seeds))
    return rows


_EPOCH_LABEL = re.compile(r"(?P<method>.+) \((?P<epochs>\d+) ep\)")


def label_epochs(summaries: list[dict]) -> list[dict]:
    """Name a method by its epoch count where one experiment ran it for several (``sgd (200 ep)``, ...)."""
    counts: dict[tuple[str, str], set[int]] = {}
    for s in summaries:
        counts.setdefault((s["experiment"], s["method"]), set()).add(s.get("epochs"))
    return [
        {**s, "method": f"{s['method']} ({s.get('epochs')} ep)"}
        if len(counts[(s["experiment"], s["method"])]) > 1
        else s
        for s in summaries
    ]


def best_of_epochs(rows: Sequence[Row], metric: str = "test_error", raw: bool = False) -> list[Row]:
    """The paper's compute-matched baseline (§3.1): SGD also trains for twice the epochs, and the better keeps.

    Rows named by :func:`label_epochs` (``sgd (200 ep)``, ``sgd (400 ep)``) of one experiment become one row
    under the plain method name holding the epoch count with the better mean (lower; higher for ``*acc*``
    metrics), whose ``note`` says which (``2x: 400 ep``, relative to the fewest epochs). With ``raw`` the
    per-epoch rows are kept too (their columns sort after SGD and SAM).
    """
    pick = max if _higher_is_better(metric) else min
    groups: dict[tuple[str, str], list[tuple[int, Row]]] = {}
    out: list[Row] = []
    for row in rows:
        match = _EPOCH_LABEL.fullmatch(row.method)
        if match is None:
            out.append(row)
            continue
        groups.setdefault((row.experiment, match["method"]), []).append((int(match["epochs"]), row))
        if raw:
            out.append(row)
    for (experiment, method), variants in groups.items():
        if any(r.experiment == experiment and r.method == method for r in out):
            raise ValueError(f"{experiment}: method {method!r} occurs both with and without an epoch count")
        fewest = min(epochs for epochs, _ in variants)
        multiples = "/".join(f"{_multiple(e, fewest)}" for e, _ in sorted(variants, key=lambda v: v[0]))
        epochs, best = pick(variants, key=lambda v: v[1].mean)
        out.append(
            replace(
                best, method=method, note=f"{_multiple(epochs, fewest)}: {epochs} ep", best_of=f"{multiples} epochs"
            )
        )
    experiments = list(dict.fromkeys(r.experiment for r in rows))
    return sorted(out, key=lambda r: (experiments.index(r.experiment), _method_key(r.method)))


def _multiple(epochs: int, fewest: int) -> str:
    return f"{epochs // fewest}x" if epochs % fewest == 0 else f"{epochs / fewest:.2g}x"


def _higher_is_better(metric: str) -> bool:
    return "acc" in metric


def _layout(rows: Sequence[Row]) -> tuple[list[str], list[str], dict[tuple[str, str], Row]]:
    experiments = list(dict.fromkeys(r.experiment for r in rows))
    methods = sorted({r.method for r in rows}, key=_method_key)
    return experiments, methods, {(r.experiment, r.method): r for r in rows}


def _cell(row: Row, digits: int) -> str:
    count = f"n={row.n}" + (f", {row.note}" if row.note else "")
    if math.isnan(row.ci):
        return f"{row.mean:.{digits}f} ({count})"
    return f"{row.mean:.{digits}f} ± {row.ci:.{digits}f} ({count})"


def _header(method: str, rows: Iterable[Row]) -> str:
    chosen = {r.best_of for r in rows if r.method == method and r.best_of}
    if not chosen:
        return method.upper()
    return f"{method.upper()} (best of {chosen.pop() if len(chosen) == 1 else 'its epoch counts'})"


def markdown_table(rows: Sequence[Row], metric: str = "test_error", digits: int = 2) -> str:
    """A Markdown table: one line per experiment, one column per method, cells ``mean ± ci (n=k)``.

    Where a line has two or more methods, the best mean (lowest; highest for metrics named ``*acc*``)
    is in bold, ties included. A missing (experiment, method) pair shows ``–``. A best-of-epochs column
    (:func:`best_of_epochs`) says so in its header and which epoch count each cell holds.
    """
    experiments, methods, cells = _layout(rows)
    lines = [
        "| Experiment | " + " | ".join(_header(m, rows) for m in methods) + " |",
        "| --- | " + " | ".join("---:" for _ in methods) + " |",
    ]
    pick = max if _higher_is_better(metric) else min
    for experiment in experiments:
        present = [cells[experiment, m] for m in methods if (experiment, m) in cells]
        best = pick(r.mean for r in present) if len(present) > 1 else None
        texts = []
        for m in methods:
            row = cells.get((experiment, m))
            text = "–" if row is None else _cell(row, digits)
            texts.append(f"**{text}**" if row is not None and row.mean == best else text)
        lines.append(f"| {experiment} | " + " | ".join(texts) + " |")
    return "\n".join(lines) + "\n"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120)
    return path


def plot_comparison(rows: Sequence[Row], path: str | Path, metric: str = "test_error") -> Path:
    """Bar chart, methods side by side per experiment, with confidence-interval error bars; PNG."""
    experiments, methods, cells = _layout(rows)
    fig = Figure(figsize=(max(4.0, 1.2 * len(experiments) * max(1, len(methods)) + 1.5), 4.0), layout="tight")
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(experiments))
    for k, method in enumerate(methods):
        present = [(i, cells[e, method]) for i, e in enumerate(experiments) if (e, method) in cells]
        pos = np.array([i for i, _ in present]) + (k - (len(methods) - 1) / 2) * width
        means = [r.mean for _, r in present]
        errs = [0.0 if math.isnan(r.ci) else r.ci for _, r in present]
        ax.bar(pos, means, width, yerr=errs, capsize=3, label=_header(method, rows))
    ax.set_xticks(x, experiments, rotation=20 if len(experiments) > 3 else 0, ha="right")
    ax.set_ylabel(metric + (" (%)" if metric.endswith("error") else ""))
    ax.set_title(f"{metric}: mean and 95% CI over seeds")
    ax.legend()
    return _save(fig, path)


def _read_metrics(file: Path) -> list[dict]:
    records = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{number}: not valid JSON ({err})") from err
        if not isinstance(record, dict) or "epoch" not in record:
            raise ValueError(f"{file}:{number}: expected an object with an 'epoch' key")
        records.append(record)
    if not records:
        raise ValueError(f"{file}: no epochs recorded")
    return records


def plot_curves(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Loss and error against epoch (train, val if recorded, test) from ``run_dir/metrics.jsonl``; PNG.

    Written to ``path`` or ``run_dir/curves.png``. A series is drawn at the epochs that record it.
    """
    run_dir = Path(run_dir)
    records = _read_metrics(run_dir / METRICS_FILE)
    fig = Figure(figsize=(9.0, 3.6), layout="tight")
    for k, quantity in enumerate(("loss", "error")):
        ax = fig.add_subplot(1, 2, k + 1)
        for split in ("train", "val", "test"):
            key = f"{split}_{quantity}"
            points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(quantity + (" (%)" if quantity == "error" else ""))
        ax.set_title(quantity)
        if ax.lines:
            ax.legend()
    fig.suptitle(run_dir.name)
    return _save(fig, path if path is not None else run_dir / "curves.png")
