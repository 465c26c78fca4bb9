"""Bad input to `opd-bench run`: every case is one line on stderr that names the problem and the fix, exit
code 2, and nothing that existed before is changed (the leaderboard's bytes, the stage folders). A loss that
turns NaN is not bad input: the run ends with status `diverged` and a leaderboard row, exit code 0.

The CLI runs in-process (`cli.main()`, the console script's entry point), so the cases cost no interpreter
start-up; the smoke world is the session's (conftest.smoke_world).
"""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest

from opd_bench.leaderboard import append_row, read_rows


def invoke(capsys, *args) -> tuple[int, str, str]:
    from opd_bench import cli

    capsys.readouterr()  # what a set-up printed is not the command's
    with mock.patch.object(sys, "argv", ["opd-bench", *args]):
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


class Case:
    """One invocation: `opd-bench run` on the smoke preset, in `tmp`, against a leaderboard with one old row."""

    def __init__(self, tmp: Path, artifacts: Path):
        self.tmp, self.artifacts = tmp, artifacts
        self.runs, self.board = tmp / "runs", tmp / "leaderboard.csv"
        append_row(self.board, {"run_id": "an-earlier-run", "method": "standard-opd", "micro-math@1.avg@k": 0.25})
        self.sets = {"artifacts_dir": artifacts, "runs_dir": self.runs, "leaderboard": self.board,
                     "eval.curve": "[]", "train.max_steps": 3}
        self.method, self.preset, self.extra = "standard-opd", "smoke", []

    def hf_world(self, **models) -> None:
        """A paper-style world (models by path) made of the smoke world's folders, with `models` overriding."""
        prompts = self.tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"{i}+{i}="}) + "\n" for i in range(8)))
        stage = {p.name.rsplit("-", 1)[0]: p for p in self.artifacts.iterdir() if (p / "stage.json").exists()}
        self.sets.update({"world.kind": "hf", "world.hf.sft_student": stage["sft-student"],
                          "world.hf.teacher": stage["teacher-a"], "world.hf.prompts": prompts})
        self.sets.update({f"world.hf.{k}": v for k, v in models.items()})

    def args(self) -> list[str]:
        sets = [x for key, value in self.sets.items() if value is not None for x in ("--set", f"{key}={value}")]
        return ["run", "--method", self.method, "--preset", self.preset, *sets, *self.extra]


def _stage(artifacts: Path, name: str) -> Path:
    return next(p for p in artifacts.iterdir() if p.name.startswith(f"{name}-") and (p / "stage.json").exists())


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- set-ups that need files


def _tokenizer_copy(case: Case, edit) -> Path:
    folder = case.tmp / "tokenizer"
    shutil.copytree(_stage(case.artifacts, "tokenizer"), folder)
    edit(folder)
    return folder


def no_chat_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def no_eos(folder: Path) -> None:
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def bigger_vocabulary_model(case: Case) -> Path:
    """A teacher whose embedding has 8 more rows than the student's tokenizer and model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(_stage(case.artifacts, "teacher-a"))
    config.vocab_size += 8
    folder = case.tmp / "other-vocab-teacher"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def truncate_arrow(stage: Path) -> None:
    arrow = next((stage / "data").glob("shard-*.parquet"))
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])


def flip_one_byte(stage: Path) -> None:
    arrow = next((stage / "data").glob("shard-*.parquet"))
    data = bytearray(arrow.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    arrow.write_bytes(bytes(data))


def other_tokenizer_fingerprint(stage: Path) -> None:
    manifest = json.loads((stage / "stage.json").read_text())
    manifest["info"]["tokenizer"] = "0" * 16  # what another tokenizer's fingerprint looks like to the check
    (stage / "stage.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def offline_artifacts(smoke_world, tmp_path_factory):
    """The smoke world plus lightning-opd's rollouts and teacher log-probs, built by a run that succeeds."""
    from opd_bench.config import load_config
    from opd_bench.run import run

    cfg, _ = smoke_world
    root = tmp_path_factory.mktemp("offline")
    artifacts = root / "artifacts"
    shutil.copytree(cfg.artifacts_dir, artifacts)
    ok = load_config("smoke", [f"artifacts_dir={artifacts}", f"runs_dir={root}/runs", f"leaderboard={root}/lb.csv",
                               "eval.curve=[]", "eval.tasks=[micro-math]", "train.max_steps=1"])
    assert run(ok, "lightning-opd")["status"] == "ok"  # the same set-up, unharmed, is fine
    return artifacts


# ----------------------------------------------------------------------------- the matrix


def _set(**values):
    return lambda case: case.sets.update(values)


def _hf(**models):
    return lambda case: case.hf_world(**models)


def _attr(**values):
    return lambda case: case.__dict__.update(values)


def _extra(*args):
    return lambda case: case.extra.extend(args)


def _write_foreign_board(case: Case) -> None:
    case.board.unlink()
    case.board.write_text("name,score\nalice,3\n")


def _runs_under_a_file(case: Case) -> None:
    (case.tmp / "a-file").write_text("not a folder")
    case.sets["runs_dir"] = case.tmp / "a-file" / "runs"


def _board_under_a_file(case: Case) -> None:
    (case.tmp / "a-file").write_text("not a folder")
    case.sets["leaderboard"] = case.tmp / "a-file" / "lb.csv"


def _board_is_a_folder(case: Case) -> None:
    case.sets["leaderboard"] = case.tmp


def _run_started_with_other_settings(case: Case) -> None:
    """A run folder whose saved config is this command's resolved config with another learning rate."""
    from opd_bench.config import load_config
    from opd_bench.resolve import resolve

    sets = [f"{key}={value}" for key, value in case.sets.items()] + ["train.lr=0.5"]
    other = resolve(load_config("smoke", sets), "standard-opd").cfg
    (case.runs / "r1").mkdir(parents=True)
    (case.runs / "r1" / "config.json").write_text(other.model_dump_json())
    case.extra += ["--run-id", "r1"]


def _run_in_progress(case: Case) -> None:
    (case.runs / "r2").mkdir(parents=True)
    case.held = (case.runs / "r2" / ".lock").open("w")  # another process working in the run: its flock
    fcntl.flock(case.held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    case.extra += ["--run-id", "r2"]


CASES = {  # name: (set-up, what the one line must say)
    "unknown method": (_attr(method="standrd-opd"), "did you mean 'standard-opd'"),
    "unknown preset": (_attr(preset="smok"), "did you mean 'smoke'"),
    "unknown task": (_set(**{"eval.tasks": "[micro-mth]"}), "did you mean 'micro-math'"),
    "budget 30x": (_extra("--budget", "30x"), "bad budget '30x'"),
    "budget -1h": (_extra("--budget=-1h"), "bad budget '-1h'"),
    "budget 0": (_extra("--budget", "0"), "bad budget '0'"),
    "budget 1e400flop": (_extra("--budget", "1e400flop"), "positive, finite"),
    "no budget": (_set(budget=""), "no budget: pass --budget"),
    "unknown --set key": (_set(**{"train.lrate": 1}), "did you mean 'lr'"),
    "mistyped --set value": (_set(**{"train.lr": "fast"}), "bad config value for 'train.lr'"),
    "--set without =": (_extra("--set", "train.lr"), "expected KEY=VALUE"),
    "--set into a value": (_set(**{"seed.x": 1}), "is a value, not a section"),
    "--set out of range": (_set(**{"train.batch_size": 0}), "bad config value for 'train.batch_size'"),
    "missing model path": (_hf(sft_student="/nonexistent/pi-sft"), "no model folder /nonexistent/pi-sft"),
    "no second teacher": (lambda c: (c.hf_world(), c.__dict__.update(method="inconsistent-offline")),
                          "needs a second teacher"),
    "vocabulary mismatch": (lambda c: c.hf_world(teacher=bigger_vocabulary_model(c)), "vocabulary mismatch"),
    "no chat template": (lambda c: c.hf_world(tokenizer=_tokenizer_copy(c, no_chat_template)), "no chat template"),
    "no EOS token": (lambda c: c.hf_world(tokenizer=_tokenizer_copy(c, no_eos)), "no EOS token"),
    "foreign leaderboard header": (_write_foreign_board, "not an opd-bench leaderboard"),
    "unwritable runs_dir": (_runs_under_a_file, "--set runs_dir="),
    "unwritable leaderboard folder": (_board_under_a_file, "--set leaderboard="),
    "leaderboard is a folder": (_board_is_a_folder, "is a folder"),
    "bad --run-id": (_extra("--run-id", "../elsewhere"), "bad --run-id"),
    "--run-id with other settings": (_run_started_with_other_settings, "other settings (train.lr: 0.5 then"),
    "--run-id in progress elsewhere": (_run_in_progress, "in progress in another process"),
}

# Offline precompute damaged after it was built: (stage, damage, message); the run reads the copy in tmp.
DAMAGED = {
    "teacher log-probs truncated": ("teacher-logps", truncate_arrow, "checksum mismatch"),
    "teacher log-probs altered": ("teacher-logps", flip_one_byte, "checksum mismatch"),
    "rollouts from another tokenizer": ("rollouts", other_tokenizer_fingerprint, "another tokenizer"),
}


def _assert_one_line_exit_2(code, err, message) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, smoke_world, tmp_path, capsys):
    cfg, _ = smoke_world
    case = Case(tmp_path, Path(cfg.artifacts_dir))
    setup, message = CASES[name]
    setup(case)
    board = case.board.read_bytes()
    stages = {p.name: (p / "stage.json").stat().st_mtime_ns for p in Path(cfg.artifacts_dir).iterdir()
              if not p.name.startswith(".")}  # a build a killed process left half-done is not a stage
    code, out, err = invoke(capsys, *case.args())
    _assert_one_line_exit_2(code, err, message)
    assert case.board.read_bytes() == board  # the leaderboard (ours or foreign) is untouched
    assert {p.name: (p / "stage.json").stat().st_mtime_ns for p in Path(cfg.artifacts_dir).iterdir()
            if not p.name.startswith(".")} == stages
    assert not case.runs.is_dir() or all(p.name in ("r1", "r2") for p in case.runs.iterdir())  # no run started


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_precompute_is_refused_and_kept(name, offline_artifacts, tmp_path, capsys):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(offline_artifacts, artifacts)
    stage_name, damage, message = DAMAGED[name]
    stage = _stage(artifacts, stage_name)
    damage(stage)
    before = _snapshot(stage)
    case = Case(tmp_path, artifacts)
    case.method = "lightning-opd"
    case.sets["eval.tasks"] = "[micro-math]"  # as the fixture's run: its pi_sft evaluation is reused
    board = case.board.read_bytes()
    code, out, err = invoke(capsys, *case.args())
    _assert_one_line_exit_2(code, err, message)
    assert "delete" in err  # the fix: rebuild the stage
    assert _snapshot(stage) == before  # neither repaired nor deleted behind the user's back
    assert case.board.read_bytes() == board


@pytest.mark.slow
def test_a_loss_that_turns_nan_ends_as_diverged_with_a_row(smoke_world, tmp_path, capsys):
    cfg, _ = smoke_world
    case = Case(tmp_path, Path(cfg.artifacts_dir))
    case.sets.update({"train.lr": "1e30", "train.max_steps": 6})
    code, out, err = invoke(capsys, *case.args())
    assert code == 0 and "Traceback" not in err, err[-2000:]
    assert "diverged" in out
    rows = read_rows(case.board)
    assert [r["run_id"] for r in rows][0] == "an-earlier-run" and rows[0]["micro-math@1.avg@k"] == "0.25"
    assert len(rows) == 2 and rows[1]["status"] == "diverged" and rows[1]["stopped_by"].startswith("diverged")
    run_dir = case.runs / rows[1]["run_id"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["after"] == {} and 1 <= metrics["steps"] < 6
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert [s["stage"] for s in ledger if s["extra"].get("charged")] == ["train"]  # its cost is still charged
    assert metrics["spent"]["device_seconds"] > 0
