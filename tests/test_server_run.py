"""Online runs with the teacher on a server (train.teacher_server_url): a localhost stdlib server speaking vLLM's
completions format (teacher_server.LocalTeacherServer) holds the smoke world's teacher A.

* the trainer's scoring through the server equals its in-process scoring (1e-5: the server answers in float32);
* a method that reads the teacher's distribution gets the server's top-k: the coarse KL (the k tokens + the rest) is
  a lower bound of the full KL, and equals it when k covers the vocabulary;
* a standard-opd smoke run scores with the server (no teacher in the training process): one row, the server's GPUs
  charged (devices = processes + server devices), the server named in the row; a vOPD run's row says its
  teacher distribution was a top-k approximation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd_bench.config import load_config

torch.set_num_threads(1)
pytestmark = pytest.mark.slow
SETS = ["eval.curve=[]", "eval.tasks=[micro-math]", "eval.n_per_split=1", "train.max_steps=3", "train.report_to=none"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.teacher_server import LocalTeacherServer
    from opd_bench.worlds import load_world

    tmp = tmp_path_factory.mktemp("server")
    cfg = load_config("smoke", [f"runs_dir={tmp}/runs", "world.hf.dtype=float64"])
    world = load_world(cfg)
    with LocalTeacherServer(load_model(world.teacher_a, cfg)) as server:
        yield {"cfg": cfg, "world": world, "tokenizer": load_tokenizer(world.tokenizer), "tmp": tmp, "server": server}


def _trainer(env, method: str, served: bool, *extra: str):
    from opd_bench.ledger import Ledger
    from opd_bench.resolve import resolve
    from opd_bench.training import TrainContext, build_trainer

    sets = [f"runs_dir={env['tmp']}/runs", "world.hf.dtype=float64", "train.report_to=none", *extra]
    if served:
        sets += [f"train.teacher_server_url={env['server'].url}", "train.teacher_server_devices=1"]
    r = resolve(load_config("smoke", sets), method)
    ctx = TrainContext(r.cfg, env["world"], env["tokenizer"], env["world"].teacher_a, env["tmp"] / "work",
                       Ledger(env["tmp"] / f"ledger-{method}-{served}.json"))
    return build_trainer(ctx, r)


def _batch(trainer, n: int = 4) -> dict:
    torch.manual_seed(3)
    prompts = [{"prompt": row["prompt"]} for row in trainer.train_dataset.select(range(n))]
    return super(type(trainer), trainer)._generate_and_score_completions(prompts)  # TRL's batch, not scored


def test_server_scoring_equals_in_process_scoring(env):
    local, served = _trainer(env, "standard-opd", False), _trainer(env, "standard-opd", True)
    assert served.teacher_model is None and served.teacher_server is not None and served.n_teacher > 0
    batch = _batch(local)
    want = local.score_batch(dict(batch))["teacher_logps"]
    before = env["server"].requests
    got = served.score_batch(dict(batch))["teacher_logps"]
    assert env["server"].requests > before
    assert got.dtype == want.dtype == torch.float64
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert served.cost.tokens_scored == local.cost.tokens_scored  # charged the same


def test_top_k_from_the_server_is_a_marked_lower_bound_of_the_full_kl(env):
    from opd_bench.token_signals import Signals

    local = _trainer(env, "vopd", False)
    vocab = local.model.config.vocab_size
    batch = _batch(local)
    count = batch["completion_mask"].sum().double()
    full = Signals(local, local.model, local.score_batch(dict(batch)), count)
    for k, exact in ((4, False), (vocab, True)):
        served = _trainer(env, "vopd", True, f"train.teacher_server_topk={k}")
        inputs = served.score_batch(dict(batch))
        assert inputs["teacher_topk_logps"].shape == (*batch["completion_ids"].shape, k)
        assert served.approximation and f"top-{k}" in served.approximation
        coarse = Signals(served, served.model, inputs, count)
        mask = coarse.mask
        assert torch.allclose(coarse.teacher_logp[mask], full.teacher_logp[mask], atol=1e-5)
        if exact:  # every token in the top-k: the coarse KL is the full KL
            assert torch.allclose(coarse.kl[mask], full.kl[mask], atol=1e-5)
        else:
            assert (coarse.kl[mask] <= full.kl[mask] + 1e-6).all() and (coarse.kl[mask] >= -1e-9).all()
            assert (coarse.kl[mask] < full.kl[mask] - 1e-6).any()
        loss = served.compute_loss(served.model, inputs)
        loss.backward()
        assert torch.isfinite(loss) and any(p.grad is not None for p in served.model.parameters())


def test_online_smoke_runs_use_the_server_and_charge_its_gpus(env):
    from opd_bench.leaderboard import read_rows
    from opd_bench.run import run

    lb = env["tmp"] / "lb.csv"
    sets = SETS + [f"runs_dir={env['tmp']}/runs", f"leaderboard={lb}", f"train.teacher_server_url={env['server'].url}",
                   "train.teacher_server_devices=2"]
    before = env["server"].requests
    metrics = run(load_config("smoke", sets), "standard-opd", "30s")
    assert env["server"].requests - before >= 3  # every step scored on the server
    run_dir = Path(env["tmp"]) / "runs" / metrics["run_id"]
    (train,) = [s for s in json.loads((run_dir / "ledger.json").read_text()) if s["stage"] == "train"]
    assert train["devices"] == 3 and train["extra"]["server_devices"] == 2 and train["tokens_scored"] > 0
    assert train["device_seconds"] == pytest.approx(3 * train["wall_seconds"])
    (row,) = read_rows(lb)
    assert row["devices"] == "3" and row["processes"] == "1" and row["teacher_server_devices"] == "2"
    assert row["teacher_server"] == env["server"].url and row["teacher_approximation"].startswith("none")

    metrics = run(load_config("smoke", sets + ["train.teacher_server_topk=8"]), "vopd", "30s")
    row = [r for r in read_rows(lb) if r["run_id"] == metrics["run_id"]][0]
    assert "top-8" in row["teacher_approximation"] and metrics["steps"] == 3
