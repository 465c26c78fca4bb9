"""The gradient-variance diagnostic (vOPD's claim is measured with it), pinned.

* `gradient_variance` equals a dense float64 reference (stacked per-group gradient vectors, their sample
  covariance) and is unbiased: averaged over many draws it recovers the known variance of a batch mean;
* through OPDTrainer on the smoke world: the logged value equals the reference computed from the method's
  own loss on the row groups, the training loss is unchanged, the measurement's FLOPs and signals are not
  recorded, and a short training run logs `opd/grad_var` every `logging_steps`.
"""

from __future__ import annotations

import pytest
import torch

from opd_bench.trainer import gradient_variance

torch.set_num_threads(1)


def _dense_reference(group_grads: torch.Tensor) -> float:
    """tr Cov of the batch gradient g = sum_h g_h from G group contributions (rows of a (G, P) matrix)."""
    g_count = group_grads.shape[0]
    estimates = g_count * group_grads  # each: an estimate of g from 1/G of the batch
    centered = estimates - estimates.mean(0, keepdim=True)
    sample_var = (centered ** 2).sum() / (g_count - 1)  # trace of the sample covariance
    return float(sample_var / g_count)  # a mean of G such estimates (= g) has 1/G of their variance


@pytest.mark.parametrize("groups", [2, 3, 5])
def test_gradient_variance_equals_the_dense_float64_reference(groups):
    torch.manual_seed(groups)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).double()
    params = list(model.parameters())
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    rows = torch.arange(10).chunk(groups)

    def loss(idx):  # a group's contribution to the batch loss (normalized by the whole batch)
        return lambda: ((model(x[idx]) - y[idx]) ** 2).sum() / 10

    var, norm2 = gradient_variance([loss(i) for i in rows], params)
    dense = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss(i)(), params)]) for i in rows])
    full = torch.cat([g.flatten() for g in torch.autograd.grad(((model(x) - y) ** 2).sum() / 10, params)])
    assert var == pytest.approx(_dense_reference(dense), rel=1e-12, abs=1e-15)
    assert norm2 == pytest.approx(float(full.pow(2).sum()), rel=1e-12)
    if groups == 2:  # two groups: simply |g_1 - g_2|^2
        assert var == pytest.approx(float((dense[0] - dense[1]).pow(2).sum()), rel=1e-12)


def test_gradient_variance_is_unbiased_for_a_batch_mean():
    """Loss = <w, mean of B samples x_i>: the gradient is the batch mean, whose variance is sum(sigma^2) / B."""
    torch.manual_seed(0)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    batch, draws = 8, 1500
    estimates = []
    for _ in range(draws):
        x = 1.0 + sigma * torch.randn(batch, 3, dtype=torch.float64)
        groups = torch.arange(batch).chunk(4)
        estimates.append(gradient_variance([lambda i=i: (x[i] @ w).sum() / batch for i in groups], [w])[0])
    truth = float((sigma ** 2).sum() / batch)
    mean = sum(estimates) / draws
    stderr = float(torch.tensor(estimates).std()) / draws ** 0.5
    assert abs(mean - truth) < 4 * stderr, (mean, truth, stderr)
    assert stderr < 0.05 * truth  # the check is sharp enough to catch a factor-of-G error


def test_one_group_is_an_error():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError):
        gradient_variance([lambda: w.sum()], [w])


# ----------------------------------------------------------------------------- through the trainer


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from opd_bench.config import load_config
    from opd_bench.models import load_tokenizer
    from opd_bench.worlds import load_world

    tmp = tmp_path_factory.mktemp("gradvar")
    cfg = load_config("smoke", [f"runs_dir={tmp}", "world.hf.dtype=float64", "train.batch_size=8"])
    world = load_world(cfg)
    return {"cfg": cfg, "world": world, "tokenizer": load_tokenizer(world.tokenizer), "tmp": tmp}


def _trainer(smoke, method_name, overrides=()):
    from datasets import Dataset

    from opd_bench.config import load_config
    from opd_bench.models import load_model
    from opd_bench.resolve import resolve
    from opd_bench.trainer import OPDTrainer, opd_args
    from opd_bench.worlds import training_prompts

    cfg = load_config("smoke", [f"runs_dir={smoke['tmp']}", "world.hf.dtype=float64", "train.batch_size=8", *overrides])
    r = resolve(cfg, method_name)
    prompts = training_prompts(cfg, 16, "gradvar")
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for _, p in prompts]})
    return OPDTrainer(model=load_model(smoke["world"].student, cfg), teacher_model=load_model(smoke["world"].teacher_a, cfg),
                      args=opd_args(r.cfg, r.data, smoke["tmp"] / "work"), train_dataset=data,
                      processing_class=smoke["tokenizer"], method=r.method, params=r.params, data=r.data)


@pytest.mark.slow
@pytest.mark.parametrize("method, overrides, head_only", [
    ("standard-opd", (), False), ("tip", ("method.params.rule=q3",), False), ("full-kl", (), False),
    ("standard-opd", (), True),  # a student above GRAD_VAR_MAX_PARAMS: the output head's gradient only
])
def test_trainer_logs_the_variance_of_its_own_loss_and_leaves_the_step_alone(smoke, method, overrides, head_only):
    trainer = _trainer(smoke, method, overrides)
    model = trainer.model
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([{"prompt": r["prompt"]} for r in trainer.train_dataset.select(range(8))])
    params = [p for p in model.parameters() if p.requires_grad]
    if head_only:
        trainer.GRAD_VAR_MAX_PARAMS = sum(p.numel() for p in params) - 1
        params = list(model.get_output_embeddings().parameters())
    model.train()  # as in a training step (TRL's full-kl loss normalizes by the global count only then)

    # The dense reference: the method's loss on each row group, its gradient as one float64 vector.
    groups = torch.arange(8).chunk(trainer.GRAD_VAR_GROUPS)
    dense = []
    for idx in groups:
        sub = {k: v[idx] if torch.is_tensor(v) and v.dim() and v.shape[0] == 8 else v for k, v in batch.items()}
        trainer._measuring = True  # the reference itself must not measure
        dense.append(torch.cat([g.flatten() for g in torch.autograd.grad(trainer.compute_loss(model, sub), params)]))
        trainer._measuring = False
    reference = _dense_reference(torch.stack(dense))

    trainer._metrics["train"].clear()
    trainer.state.global_step, trainer._step = trainer.args.logging_steps - 1, 0  # the next step is logged
    assert trainer._grad_variance_due()
    flops = trainer.cost.flops
    loss_measured = trainer.compute_loss(model, batch)
    flops_measured, flops = trainer.cost.flops - flops, trainer.cost.flops
    logged = dict(trainer._metrics["train"])
    trainer.state.global_step = 0  # a step that is not logged: no measurement
    assert not trainer._grad_variance_due()
    trainer._metrics["train"].clear()
    loss_plain = trainer.compute_loss(model, batch)
    flops_plain = trainer.cost.flops - flops

    assert logged["opd/grad_var"] == [pytest.approx(reference, rel=1e-9)]
    assert logged["opd/grad_norm2"][0] > 0 and reference != 0
    assert float(loss_measured.detach()) == float(loss_plain.detach())  # the step's loss is untouched
    assert flops_measured == flops_plain > 0  # the measurement's FLOPs are not charged to the method
    assert len(logged["opd/tokens_kept"]) == 1  # the groups' signals were not logged, only the step's own


@pytest.mark.slow
def test_training_logs_grad_var_every_logging_step_and_gives_its_time_back_to_the_budget(smoke):
    from opd_bench.budget import BudgetCallback, parse_budget
    from opd_bench.row import log_means

    trainer = _trainer(smoke, "standard-opd", ("train.logging_steps=2", "train.max_steps=4"))
    callback = BudgetCallback(parse_budget("1h"))
    trainer.add_callback(callback)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "opd/grad_var" in e]
    assert [e["step"] for e in logged] == [2, 4]
    assert all(e["opd/grad_norm2"] > 0 for e in logged)
    assert callback.paused > 0  # measured time is not charged
    means = log_means(trainer.state.log_history)
    assert means["grad_var"] == pytest.approx(sum(e["opd/grad_var"] for e in logged) / 2)
