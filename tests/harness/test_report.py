"""Seed aggregation, the Markdown table and the PNG plots, on run directories written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from scipy import stats

from sharpness.harness.report import (
    Row,
    aggregate,
    best_of_epochs,
    collect_summaries,
    label_epochs,
    markdown_table,
    mean_ci,
    plot_comparison,
    plot_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (experiment, method) -> test_error per seed
RUNS = {
    ("cifar10", "sgd"): [4.0, 4.2, 4.1],
    ("cifar10", "sam"): [3.5, 3.6, 3.7],
    ("cifar100", "sgd"): [20.0],
}


def _write_run(root: Path, experiment: str, method: str, seed: int, test_error: float, epochs: int = 3) -> Path:
    run = root / experiment / f"{method}-seed{seed}"
    run.mkdir(parents=True)
    summary = {
        "experiment": experiment,
        "method": method,
        "seed": seed,
        "metrics": {"test_error": test_error, "test_loss": test_error / 10, "train_error": 0.5},
        "epochs": epochs,
        "config": {"epochs": epochs, "rho": 0.05 if method == "sam" else 0.0},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [
        {
            "epoch": e,
            "train_loss": 2.0 / e,
            "train_error": 50.0 / e,
            "test_loss": 2.2 / e,
            "test_error": 55.0 / e,
            "lr": 0.1,
            "seconds": 1.0,
        }
        for e in range(1, epochs + 1)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for (experiment, method), errors in RUNS.items():
        for seed, error in enumerate(errors):
            _write_run(root, experiment, method, seed, error)
    return root


def test_mean_ci_is_student_t():
    mean, half = mean_ci([1, 2, 3, 4])
    assert mean == 2.5
    assert half == pytest.approx(stats.t.ppf(0.975, 3) * math.sqrt(5 / 3) / 2, rel=1e-12)
    assert half == pytest.approx(2.0542603, abs=1e-7)  # t_{0.975,3} = 3.1824463
    mean, half = mean_ci([1, 2, 3, 4, 5], confidence=0.9)
    assert mean == 3.0 and half == pytest.approx(stats.t.ppf(0.95, 4) * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)
    assert mean_ci([7.0, 7.0]) == (7.0, 0.0)
    mean, half = mean_ci([3.25])
    assert mean == 3.25 and math.isnan(half)
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])


def test_collect_from_parent_and_run_dirs(runs: Path):
    found = collect_summaries([runs])
    assert len(found) == 7
    assert {(s["experiment"], s["method"], s["seed"]) for s in found} == {
        (e, m, seed) for (e, m), errors in RUNS.items() for seed in range(len(errors))
    }
    one = runs / "cifar10" / "sam-seed1"
    again = collect_summaries([one, one / "summary.json", runs / "cifar100"])
    assert [s["run_dir"] for s in again] == [str(one), str(runs / "cifar100" / "sgd-seed0")]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        collect_summaries([runs / "nowhere"])


def test_aggregate_groups_by_experiment_and_method(runs: Path):
    rows = aggregate(collect_summaries([runs]))
    assert [(r.experiment, r.method, r.n) for r in rows] == [
        ("cifar10", "sgd", 3),
        ("cifar10", "sam", 3),
        ("cifar100", "sgd", 1),
    ]
    sam = rows[1]
    assert sam.values == (3.5, 3.6, 3.7) and sam.seeds == (0, 1, 2)
    assert (sam.mean, sam.ci) == mean_ci([3.5, 3.6, 3.7])
    assert math.isnan(rows[2].ci)
    loss = aggregate(collect_summaries([runs]), metric="test_loss")
    assert loss[0].values == pytest.approx((0.4, 0.42, 0.41))


def test_markdown_table_exact(runs: Path):
    table = markdown_table(aggregate(collect_summaries([runs])))
    assert table == (
        "| Experiment | SGD | SAM |\n"
        "| --- | ---: | ---: |\n"
        "| cifar10 | 4.10 ± 0.25 (n=3) | **3.60 ± 0.25 (n=3)** |\n"
        "| cifar100 | 20.00 (n=1) | – |\n"
    )


@pytest.fixture
def compute_matched(tmp_path: Path) -> Path:
    """SGD for 3 and 6 epochs beside SAM for 3: 6 epochs are better on cifar10, 3 on cifar100."""
    root = tmp_path / "matched"
    for experiment, sgd, sgd_2x, sam in (
        ("cifar10", [4.0, 4.2, 4.1], [3.8, 3.9, 4.0], [3.5, 3.6, 3.7]),
        ("cifar100", [20.0, 21.0], [22.0, 23.0], [18.0, 18.5]),
    ):
        for seed, (a, b, c) in enumerate(zip(sgd, sgd_2x, sam, strict=True)):
            _write_run(root, experiment, "sgd", seed, a, epochs=3)
            _write_run(root / "2x", experiment, "sgd", seed, b, epochs=6)
            _write_run(root, experiment, "sam", seed, c, epochs=3)
    return root


def test_compute_matched_sgd_is_one_best_of_column_before_sam(compute_matched: Path):
    rows = best_of_epochs(aggregate(label_epochs(collect_summaries([compute_matched]))))
    assert [(r.experiment, r.method, r.note) for r in rows] == [
        ("cifar10", "sgd", "2x: 6 ep"),
        ("cifar10", "sam", ""),
        ("cifar100", "sgd", "1x: 3 ep"),
        ("cifar100", "sam", ""),
    ]
    assert rows[0].values == (3.8, 3.9, 4.0) and rows[2].values == (20.0, 21.0)
    assert markdown_table(rows) == (
        "| Experiment | SGD (best of 1x/2x epochs) | SAM |\n"
        "| --- | ---: | ---: |\n"
        "| cifar10 | 3.90 ± 0.25 (n=3, 2x: 6 ep) | **3.60 ± 0.25 (n=3)** |\n"
        "| cifar100 | 20.50 ± 6.35 (n=2, 1x: 3 ep) | **18.25 ± 3.18 (n=2)** |\n"
    )


def test_compute_matched_raw_columns_stay_available(compute_matched: Path):
    rows = best_of_epochs(aggregate(label_epochs(collect_summaries([compute_matched]))), raw=True)
    assert markdown_table(rows).splitlines()[:3] == [
        "| Experiment | SGD (best of 1x/2x epochs) | SAM | SGD (3 EP) | SGD (6 EP) |",
        "| --- | ---: | ---: | ---: | ---: |",
        "| cifar10 | 3.90 ± 0.25 (n=3, 2x: 6 ep) | **3.60 ± 0.25 (n=3)** | 4.10 ± 0.25 (n=3) | 3.90 ± 0.25 (n=3) |",
    ]


def test_best_of_epochs_picks_the_higher_accuracy():
    rows = [
        Row("c10", "sgd (200 ep)", 1, 96.0, math.nan, (96.0,), (0,)),
        Row("c10", "sgd (400 ep)", 1, 95.0, math.nan, (95.0,), (0,)),
    ]
    (best,) = best_of_epochs(rows, metric="test_accuracy")
    assert (best.method, best.mean, best.note, best.best_of) == ("sgd", 96.0, "1x: 200 ep", "1x/2x epochs")
    plain = [Row("c10", "sgd", 1, 96.0, math.nan, (96.0,), (0,))]
    assert best_of_epochs(plain) == plain  # one epoch count: nothing to choose


def test_markdown_table_bolds_the_highest_accuracy():
    rows = [
        Row("c10", "sgd", 2, 96.0, 0.1, (95.9, 96.1), (0, 1)),
        Row("c10", "sam", 2, 97.0, 0.1, (96.9, 97.1), (0, 1)),
    ]
    assert markdown_table(rows, metric="test_accuracy").splitlines()[2] == (
        "| c10 | 96.00 ± 0.10 (n=2) | **97.00 ± 0.10 (n=2)** |"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"experiment": "c", "seed": 0, "metrics": {}}', "missing key 'method'"),
        ('{"experiment": "c", "method": "sgd", "seed": "0", "metrics": {}}', "'seed' must be int"),
        (
            '{"experiment": "c", "method": "sgd", "seed": 0, "metrics": {"test_error": "3"}}',
            "must be a number",
        ),
    ],
)
def test_malformed_summary_names_the_file(tmp_path: Path, content: str, message: str):
    bad = tmp_path / "broken-run" / "summary.json"
    bad.parent.mkdir()
    bad.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        collect_summaries([tmp_path])
    assert str(bad) in str(err.value)


def test_aggregate_rejects_missing_metric_and_repeated_seed(runs: Path):
    with pytest.raises(ValueError, match="no metric 'test_accuracy'"):
        aggregate(collect_summaries([runs]), metric="test_accuracy")
    _write_run(runs / "copy", "cifar10", "sam", 1, 3.0)
    with pytest.raises(ValueError, match="seed 1 of cifar10/sam occurs twice"):
        aggregate(collect_summaries([runs]))


def _assert_png(path: Path, size: tuple[int, int]) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    with Image.open(path) as image:
        assert image.size == size
        assert len(image.convert("L").getcolors(maxcolors=1 << 16)) > 50  # something was drawn


def test_plot_comparison_writes_a_png(runs: Path, tmp_path: Path):
    rows = aggregate(collect_summaries([runs]))
    out = plot_comparison(rows, tmp_path / "plots" / "comparison.png")
    assert out == tmp_path / "plots" / "comparison.png"
    _assert_png(out, (int(round(120 * (1.2 * 2 * 2 + 1.5))), 480))


def test_plot_curves_writes_a_png(runs: Path, tmp_path: Path):
    run = runs / "cifar10" / "sgd-seed0"
    out = plot_curves(run)
    assert out == run / "curves.png"
    _assert_png(out, (1080, 432))
    assert plot_curves(run, tmp_path / "c.png") == tmp_path / "c.png"
    (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 1.0}\n{"epoch": 2, \n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        plot_curves(run)
