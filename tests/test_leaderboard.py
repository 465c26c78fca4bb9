"""leaderboard.csv: concurrent appends lose and tear nothing; a foreign file is refused; the row helpers and
`opd-bench leaderboard` filter as documented."""

from __future__ import annotations

import csv
import math
from multiprocessing import get_context
from pathlib import Path

import pytest
from typer.testing import CliRunner

from opd_bench.errors import UserError
from opd_bench.leaderboard import append_row, finished_keys, read_rows
from opd_bench.row import log_means, status_of

WORKERS, ROWS = 8, 50


def _payload(worker: int, i: int) -> str:
    return f'w{worker} "row" {i}, with a comma\nand a newline'  # every CSV quoting rule at once


def _append(args) -> None:
    path, worker = args
    for i in range(ROWS):
        row = {"run_id": f"{worker}-{i}", "method": "m", "payload": _payload(worker, i), "value": i / 7}
        if i % 10 == 0:
            row[f"col{worker}-{i}"] = "new"  # a column the file lacks: the whole file is rewritten
        append_row(path, row)


def test_8_processes_appending_50_rows_each_leave_400_intact_rows(tmp_path):
    path = tmp_path / "leaderboard.csv"
    with get_context("spawn").Pool(WORKERS) as pool:
        pool.map(_append, [(path, w) for w in range(WORKERS)])
    rows = read_rows(path)
    assert len(rows) == WORKERS * ROWS
    by_id = {r["run_id"]: r for r in rows}
    assert len(by_id) == WORKERS * ROWS
    for w in range(WORKERS):
        for i in range(ROWS):
            r = by_id[f"{w}-{i}"]
            assert r["payload"] == _payload(w, i) and r["method"] == "m"
            assert float(r["value"]) == pytest.approx(i / 7, rel=1e-5)
            assert all(r[f"col{w}-{j}"] == ("new" if j == i else "") for j in range(0, ROWS, 10))
    header = next(csv.reader(path.open()))
    assert header[:2] == ["run_id", "method"] and len(header) == 4 + WORKERS * ROWS // 10
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # no temporary file left behind


def test_a_foreign_csv_is_refused_and_left_as_it_was(tmp_path):
    path = tmp_path / "leaderboard.csv"
    path.write_text("name,score\nalice,3\n")
    with pytest.raises(UserError, match="not an opd-bench leaderboard"):
        append_row(path, {"run_id": "x"})
    assert path.read_text() == "name,score\nalice,3\n"


def test_cells_and_finished_keys(tmp_path):
    path = tmp_path / "lb.csv"
    append_row(path, {"run_id": "a", "run_key": "k1", "x": 1 / 3, "curve": [[0.0, 1.5, {"t": 0.25}]], "none": None})
    append_row(path, {"run_id": "b", "status": "diverged", "run_key": "k2"})
    append_row(path, {"run_id": "c"})  # a row written before run keys existed
    rows = read_rows(path)
    assert rows[0]["x"] == "0.333333" and rows[0]["curve"] == '[[0.0,1.5,{"t":0.25}]]' and rows[0]["none"] == ""
    assert finished_keys(path) == {"k1", "k2"}  # a diverged run is finished too


def test_log_means_and_status():
    history = [{"loss": 1.0, "opd/grad_var": 2.0, "opd/tokens_kept": 0.5}, {"loss": 3.0, "opd/grad_var": 4.0},
               {"train_loss": 2.0}]
    means = log_means(history)
    assert means == {"grad_var": 3.0, "tokens_kept": 0.5, "train_loss": 2.0}
    assert math.isnan(log_means([{"loss": 1.0}, {"loss": float("nan")}])["train_loss"])
    ok = {"after": {"t": {"avg@k": 0.5}}, "train": {"train_loss": 1.0}, "stopped_by": "budget"}
    assert status_of(ok) == "ok"
    assert status_of({**ok, "train": {"train_loss": float("nan")}}) == "diverged"
    assert status_of({**ok, "stopped_by": "budget (precompute)"}) == "budget-exhausted-before-eval"


def test_leaderboard_command_filters_and_selects_columns():
    from opd_bench.cli import app

    fixture = Path(__file__).parent / "fixtures" / "report" / "leaderboard.csv"
    runner = CliRunner()
    out = runner.invoke(app, ["leaderboard", "--file", str(fixture), "--method", "exopd", "--seed", "1",
                              "--columns", "run_id,method,seed,*.avg@k"])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if "-exopd-s1-" in line]
    assert len(lines) == 2  # exopd and exopd lam=1.5 at seed 1, nothing else
    assert "micro-math@1.avg@k" in out.output and "base_avg" not in out.output and "run_key" not in out.output
    out = runner.invoke(app, ["leaderboard", "--file", str(fixture), "--columns", "run_id,metod"])
    assert isinstance(out.exception, UserError) and "did you mean 'method'" in str(out.exception)
