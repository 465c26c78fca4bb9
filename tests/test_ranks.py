"""Multi-rank runs on CPU: `torchrun --nproc_per_node 2` with gloo (no GPU, no NCCL here), on the smoke preset.

* an online and an offline method: one run folder, exactly one new leaderboard row, the training stage charged for 2
  devices, both ranks at the same steps, the global batch the preset's (rows per step, all ranks together);
* rank 1's clock runs 50x fast: both ranks still stop, checkpoint and evaluate at rank 0's points;
* 2-rank DDP (micro-batch 1) vs 1 rank with 2 accumulation steps, float64, SGD: the same parameters after a step;
* rank 1 SIGKILLed mid-training: the job stops within a minute with one `error:` line and no row; resumed under 2
  ranks it finishes with one row, its budget counting the device time spent before the kill.

Each rank writes its per-step decisions to OPD_BENCH_RANK_LOG (resume.rank_log). `python tests/test_ranks.py
ddp-worker OUT` is the DDP test's worker (started by torchrun).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["--set", "eval.tasks=[micro-math]", "--set", "eval.n_per_split=1", "--set", "train.report_to=none"]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_BENCH_QUIET": "1", "PYTHONWARNINGS": "ignore",
           "TOKENIZERS_PARALLELISM": "false"}
    for key in ("OPD_BENCH_KILL_AT", "OPD_BENCH_CLOCK_SKEW", "OPD_BENCH_RANK_LOG", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    return {**env, **{k: str(v) for k, v in extra.items()}}


def _torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *args]


def _run_cmd(tmp: Path, method: str, *extra: str) -> list[str]:
    return _torchrun(2, "-m", "opd_bench.cli", "run", "--method", method, "--preset", "smoke",
                     "--set", f"runs_dir={tmp}/runs", "--set", f"leaderboard={tmp}/lb.csv", *SMOKE, *extra)


def _rank_logs(folder: Path) -> dict[int, list[dict]]:
    return {r: [json.loads(line) for line in (folder / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)}


def _rows(tmp: Path) -> list[dict]:
    from opd_bench.leaderboard import read_rows

    return read_rows(tmp / "lb.csv")


def _ledger(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "ledger.json").read_text())


def _check_one_run(tmp: Path, proc) -> tuple[Path, dict]:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (run_dir,) = (tmp / "runs").iterdir()  # one run folder, not one per rank
    rows = _rows(tmp)
    assert [r["run_id"] for r in rows] == [run_dir.name]  # exactly one row
    (train,) = [s for s in _ledger(run_dir) if s["stage"] == "train"]
    assert train["devices"] == 2 and train["extra"]["processes"] == 2
    assert rows[0]["processes"] == "2" and rows[0]["devices"] == "2"
    logs = _rank_logs(tmp / "ranks")
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == list(range(1, len(logs[0]) + 1))
    for a, b in zip(logs[0], logs[1]):
        assert (a["save"], a["stop"]) == (b["save"], b["stop"])  # the ranks decided together
        assert a["rows"] + b["rows"] == 8 and a["processes"] == 2  # smoke's train.batch_size, not 8 per rank
    assert logs[0][-1]["stop"]
    assert proc.stdout.count("pi_sft avg@k") == 1  # rank 0 prints the results table, the other rank is quiet
    return run_dir, logs


@pytest.mark.slow
def test_two_ranks_online_run_follows_rank_0s_clock(tmp_path):
    """standard-opd, 2 ranks, stopped by the budget; rank 1's clock runs 50x fast (it alone would stop, save and
    evaluate at its first step). The budget, the checkpoints and the 50% evaluation are rank 0's."""
    proc = subprocess.run(_run_cmd(tmp_path, "standard-opd", "--budget", "4s", "--set", "train.max_steps=40",
                                   "--set", "train.checkpoint_seconds=0.6", "--set", "eval.curve=[0.5]",
                                   "--set", "eval.n_per_split_curve=1"),
                          cwd=REPO, env=_env(OPD_BENCH_RANK_LOG=tmp_path / "ranks", OPD_BENCH_CLOCK_SKEW="1:50"),
                          capture_output=True, text=True, timeout=240)
    run_dir, logs = _check_one_run(tmp_path, proc)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["stopped_by"] == "budget" and metrics["steps"] == len(logs[0]) >= 3
    saves = [e["step"] for e in logs[0] if e["save"]]
    assert saves and len(saves) < len(logs[0])  # rank 0's 0.6 s, not rank 1's (due at every step)
    stages = [s["stage"] for s in _ledger(run_dir)]
    assert stages.count("eval@50%") == 1
    assert [p["mark"] for p in metrics["curve"]] == [0.0, 0.5, 1.0]
    steps = json.loads((run_dir / "budget_steps.json").read_text())
    assert [s["step"] for s in steps] == [e["step"] for e in logs[0]]  # rank 0 recorded every step once
    assert steps[-1]["device_seconds"] >= 4.0 > steps[-2]["device_seconds"]


@pytest.mark.slow
def test_two_ranks_offline_run(tmp_path):
    """lightning-opd, 2 ranks: the precompute is built by both (its shards split over ranks), training stops at
    the step limit on both, one row."""
    proc = subprocess.run(_run_cmd(tmp_path, "lightning-opd", "--budget", "60s", "--set", "train.max_steps=3",
                                   "--set", "eval.curve=[]", "--set", "train.rollout_prompts=16", "--seed", "5"),
                          cwd=REPO, env=_env(OPD_BENCH_RANK_LOG=tmp_path / "ranks"), capture_output=True, text=True,
                          timeout=240)
    run_dir, logs = _check_one_run(tmp_path, proc)
    assert len(logs[0]) == 3
    charged = [s["stage"] for s in _ledger(run_dir) if s["extra"].get("charged")]
    assert charged == ["rollouts", "teacher-logps", "train"]


# ----------------------------------------------------------------------------- DDP == accumulation


def _ddp_worker(out: str) -> None:
    """One step of lightning-opd's trainer on fixed offline rows, float64, SGD; rank 0 saves the parameters."""
    import torch
    from datasets import Dataset
    from transformers.training_args import OptimizerNames

    from opd_bench.config import load_config
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.resolve import resolve
    from opd_bench.resume import Ranks
    from opd_bench.trainer import OPDTrainer, opd_args
    from opd_bench.worlds import load_world

    torch.set_num_threads(1)
    ranks = Ranks.start()
    cfg = load_config("smoke", ["world.hf.dtype=float64", "train.batch_size=2", "train.micro_batch_size=1",
                                "train.lr=0.5", "train.max_steps=1", "train.max_grad_norm=1e9",
                                "train.report_to=none", f"runs_dir={out}"])
    r = resolve(cfg, "lightning-opd")
    world = ranks.main_first(load_world, r.cfg)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        # One length: a generation batch is padded as a whole, and HF's RoPE tables are float32, so a row's left
        # padding (its absolute positions) changes its numbers at ~1e-8 whichever way the batch is split.
        p, c = 4, 3
        rows.append({"prompt_ids": torch.randint(1, 20, (p,), generator=g).tolist(),
                     "completion_ids": torch.randint(1, 20, (c,), generator=g).tolist(),
                     "teacher_logps": (-torch.rand(c, generator=g, dtype=torch.float64) * 3).tolist()})
    data = Dataset.from_list(rows)
    args = opd_args(r.cfg, r.data, Path(out) / f"work-{ranks.world}", len(rows))
    args.optim = OptimizerNames.SGD  # Adam's first step is ~lr * sign(g): it would hide a wrong gradient scale
    model = load_model(world.student, r.cfg, role="student", device=None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = OPDTrainer(model=model, teacher_model=None, args=args, train_dataset=data,
                         processing_class=load_tokenizer(world.tokenizer), method=r.method, params=r.params,
                         data=r.data)
    trainer.train()
    if ranks.main:
        after = {n: p.detach().cpu() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
        torch.save({"before": before, "after": after, "accumulation": args.gradient_accumulation_steps,
                    "processes": ranks.world, "rows": trainer.rows_trained}, Path(out) / f"params-{ranks.world}.pt")


@pytest.mark.slow
def test_ddp_step_equals_one_rank_with_accumulation(tmp_path):
    import torch

    for n in (2, 1):
        proc = subprocess.run(_torchrun(n, str(Path(__file__).resolve()), "ddp-worker", str(tmp_path)), cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two, one = (torch.load(tmp_path / f"params-{n}.pt") for n in (2, 1))
    assert (two["processes"], two["accumulation"], two["rows"]) == (2, 1, 1)  # 2 ranks x micro 1
    assert (one["processes"], one["accumulation"], one["rows"]) == (1, 2, 2)  # 1 rank x micro 1 x 2 steps
    moved = max((one["after"][k] - one["before"][k]).abs().max().item() for k in one["after"])
    assert moved > 1e-4
    for key in one["after"]:
        assert one["after"][key].dtype == torch.float64
        err = (two["after"][key] - one["after"][key]).abs().max().item()
        assert err <= 1e-12, (key, err)


# ----------------------------------------------------------------------------- a rank dies


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "opd_bench.cli" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} process")


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_the_run_resumes_under_two_ranks(tmp_path):
    cmd = _run_cmd(tmp_path, "standard-opd", "--budget", "60s", "--set", "train.max_steps=12", "--set",
                   "eval.curve=[]", "--set", "train.checkpoint_seconds=0", "--run-id", "killed")
    run_dir = tmp_path / "runs" / "killed"
    steps = run_dir / "budget_steps.jsonl"
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 150
    while not (steps.exists() and len(steps.read_text().splitlines()) >= 3):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = proc.communicate(timeout=90)
    assert time.monotonic() - killed_at < 60
    assert proc.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-4000:]
    assert "run killed stopped on rank 0 of 2" in errors[0] and "--run-id killed" in errors[0]
    assert not (tmp_path / "lb.csv").exists() or not _rows(tmp_path)  # no row
    (first,) = [s for s in _ledger(run_dir) if s["stage"] == "train"]
    spent_before = first["device_seconds"]
    assert spent_before > 0 and first["devices"] == 2 and first["extra"]["steps"] >= 3

    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = _rows(tmp_path)
    assert [r["run_id"] for r in rows] == ["killed"]
    attempts = [s for s in _ledger(run_dir) if s["stage"] == "train"]
    assert len(attempts) == 2 and attempts[0] == first and all(a["devices"] == 2 for a in attempts)
    assert attempts[1]["extra"]["resumed_from_step"] >= 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["attempts"] == 2 and metrics["steps"] == 12
    assert float(rows[0]["spent_device_s"]) == pytest.approx(sum(a["device_seconds"] for a in attempts), rel=1e-4)
    assert float(rows[0]["spent_device_s"]) > spent_before
    second = [s for s in json.loads((run_dir / "budget_steps.json").read_text()) if s["attempt"] == 2]
    assert second[0]["device_seconds"] >= spent_before  # the budget went on from what was spent before the kill


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "ddp-worker":
    _ddp_worker(sys.argv[2])
