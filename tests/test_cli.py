"""The command line end to end on the smoke world: prepare reuses its cache, eval writes records,
bad input is one line on stderr with exit code 2."""

import json
import os
import subprocess
import sys
import time

import pytest


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "opd_bench.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_prepare_is_cached_and_eval_writes_per_sample_records(smoke_world, tmp_path):
    cfg, world = smoke_world
    start = time.perf_counter()
    out = cli("prepare", "--preset", "smoke", "--set", f"artifacts_dir={cfg.artifacts_dir}")
    assert out.returncode == 0, out.stderr
    assert time.perf_counter() - start < 30  # every stage reused (includes interpreter start-up)
    assert out.stdout.count(" yes ") >= 5  # the "cached" column

    out = cli("eval", "--preset", "smoke", "--set", f"artifacts_dir={cfg.artifacts_dir}",
              "--model", "sft-student", "--task", "micro-math", "--out", str(tmp_path), "--k", "2")
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "micro-math" / "samples.jsonl").read_text().splitlines()]
    metrics = json.loads((tmp_path / "micro-math" / "metrics.json").read_text())
    assert len(records) == 2 * metrics["n_problems"] == 2 * 12  # smoke: 4 problems x 3 splits, k = 2
    assert {"prompt", "completion", "extracted", "correct", "detail"} <= set(records[0])
    assert metrics["task"] == "micro-math@1" and metrics["k"] == 2
    assert metrics["avg@k"] == pytest.approx(sum(r["correct"] for r in records) / len(records))


def test_eval_temperature_overrides_the_cards_protocol(smoke_world, tmp_path):
    cfg, _ = smoke_world
    out = cli("eval", "--preset", "smoke", "--set", f"artifacts_dir={cfg.artifacts_dir}", "--model", "sft-student",
              "--task", "micro-math", "--out", str(tmp_path), "--k", "2", "--temperature", "1.0")
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp_path / "micro-math" / "metrics.json").read_text())
    assert metrics["protocol"]["temperature"] == 1.0  # the card says 0 (greedy)
    records = [json.loads(line) for line in (tmp_path / "micro-math" / "samples.jsonl").read_text().splitlines()]
    pairs = {}
    for r in records:
        pairs.setdefault(r["problem_id"], []).append(r["completion"])
    assert any(a != b for a, b in pairs.values())  # greedy would give two identical samples per problem


def test_eval_accepts_a_model_folder(smoke_world, tmp_path):
    cfg, world = smoke_world
    out = cli("eval", "--preset", "smoke", "--model", str(world.teacher_b), "--task", "micro-code",
              "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "micro-code" / "metrics.json").exists()


@pytest.mark.parametrize("args, message", [
    (["eval", "--model", "sft-studnt"], "did you mean 'sft-student'"),
    (["eval", "--model", "/nonexistent/model"], "no model folder or stage"),
    (["eval", "--model", "teacher-a", "--task", "micro-mth", "--preset", "smoke",
      "--set", "artifacts_dir=/nonexistent"], "not built yet"),
    (["prepare", "--preset", "mcro"], "did you mean 'micro'"),
    (["prepare", "--set", "world.teacher.layer=2"], "did you mean 'layers'"),
    (["prepare", "--set", "world.teacher.layers=two"], "valid integer"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = cli(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], out.stderr
