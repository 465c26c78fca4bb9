"""loss_peak_mb, the leaderboard column TIP's memory claim reads: the allocator's peak of the loss computation.

* memory.peak_bytes sees a known allocation (and not twice it);
* an OPD training run records it once (the attempt's first micro-batch) and the row gets it (row.log_means);
* the measured step trains exactly as an unmeasured one: same loss, same gradients (one backward, not two).
"""

from __future__ import annotations

import pytest
import torch

from opd_bench.config import load_config
from opd_bench.memory import AllocatorPeak, peak_bytes

torch.set_num_threads(1)


@pytest.mark.parametrize("n_bytes", [4 * 2**20, 40 * 2**20])
def test_peak_bytes_sees_a_known_allocation_once(n_bytes):
    def work():
        x = torch.empty(n_bytes // 4, dtype=torch.float32)
        x.fill_(1.0)
        del x
        y = torch.zeros(n_bytes // 8, dtype=torch.float32)  # half of it, after the first is freed: not added
        del y

    peak = peak_bytes(work)
    assert n_bytes <= peak < 1.2 * n_bytes, peak / n_bytes
    assert peak_bytes(lambda: None) < 2**16  # the baseline is what was allocated before, not the process


def test_peak_bytes_counts_what_is_held_at_once():
    n = 2**20

    def work():
        held = [torch.ones(n // 4) for _ in range(3)]  # 3 x 1 MiB alive together
        del held

    assert 3 * n <= peak_bytes(work) < 3.5 * n
    with AllocatorPeak("cpu") as peak:
        torch.ones(n // 4)
    assert n <= peak.bytes == peak.bytes < 1.5 * n  # read once, kept


@pytest.fixture(scope="module")
def env(smoke_world, tmp_path_factory):
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.worlds import load_world

    cfg, _ = smoke_world
    tmp = tmp_path_factory.mktemp("loss-memory")
    base = [f"artifacts_dir={cfg.artifacts_dir}", f"runs_dir={tmp}", "world.hf.dtype=float64", "train.batch_size=4",
            "train.max_steps=1", "train.logging_steps=5"]
    cfg = load_config("smoke", base)
    world = load_world(cfg)
    return {"base": base, "world": world, "tokenizer": load_tokenizer(world.tokenizer), "tmp": tmp,
            "load": lambda path: load_model(path, cfg)}


def _trainer(env, method, overrides=()):
    from datasets import Dataset

    from opd_bench.resolve import resolve
    from opd_bench.trainer import OPDTrainer, opd_args
    from opd_bench.training import teacher_of
    from opd_bench.worlds import training_prompts

    r = resolve(load_config("smoke", [*env["base"], *overrides]), method)
    prompts = training_prompts(r.cfg, 8, "loss-memory")
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for _, p in prompts]})
    return OPDTrainer(model=env["load"](env["world"].student), teacher_model=env["load"](teacher_of(r, env["world"])),
                      args=opd_args(r.cfg, r.data, env["tmp"] / f"work-{method}"), train_dataset=data,
                      processing_class=env["tokenizer"], method=r.method, params=r.params, data=r.data)


@pytest.mark.parametrize("method, overrides", [("tip", ["method.params.fraction=0.5"]), ("full-kl", [])])
def test_a_training_run_records_the_loss_peak_once_and_the_row_gets_it(env, method, overrides):
    from opd_bench.budget import BudgetCallback, parse_budget
    from opd_bench.row import log_means

    trainer = _trainer(env, method, overrides)
    clock = BudgetCallback(parse_budget("1h"))
    trainer.add_callback(clock)
    torch.manual_seed(0)
    trainer.train()  # one step (train.max_steps=1), not a logging step (logging_steps=5): the final log carries it
    logged = [e["opd/loss_peak_mb"] for e in trainer.state.log_history if "opd/loss_peak_mb" in e]
    assert len(logged) == 1 and 0 < logged[0] < 100, logged  # a 1-layer, 16-wide student: far below 100 MB
    assert log_means(trainer.state.log_history)["loss_peak_mb"] == logged[0]
    assert clock.paused > 0  # the profiler's start and its events' reading are not charged to the method
    print(f"{method}: loss_peak_mb = {logged[0]:.3f}")


def test_the_measured_step_trains_as_an_unmeasured_one(env):
    """The same micro-batch through training_step, measured (the attempt's first) then not: same loss and gradient,
    so the backward ran once, inside the measurement."""
    trainer = _trainer(env, "tip", ["method.params.fraction=0.5"])
    torch.manual_seed(1)
    prompts = [{"prompt": r["prompt"]} for r in trainer.train_dataset.select(range(4))]
    batch = trainer._generate_and_score_completions(prompts)
    trainer._prepare_inputs = lambda inputs: batch  # no new generation: the step is the loss and its backward
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    model = trainer.model

    def step():
        model.zero_grad()
        loss = trainer.training_step(model, {}, batch["num_items_in_batch"])
        return loss, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    loss_measured, grad_measured = step()
    peak = trainer._metrics["train"]["opd/loss_peak_mb"]
    assert len(peak) == 1 and peak[0] > 0
    loss_plain, grad_plain = step()
    assert trainer._metrics["train"]["opd/loss_peak_mb"] == peak  # once per attempt
    assert torch.equal(loss_measured, loss_plain)
    assert grad_plain.abs().max() > 0 and torch.equal(grad_measured, grad_plain)
