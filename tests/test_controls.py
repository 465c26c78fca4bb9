"""The iso-cost controls of issue #16, pinned end to end like tests/test_method_math.py.

dagger-sft: the loss and gradient of one micro-batch of the smoke world in float64, through the real trainer path
(OPDTrainer.compute_loss -> Signals -> the method file's loss), equal an independent float64 reference written here
from the formula, from the models' own logits: the forward KL(pT || pS) at every position of the student's samples,
or the cross-entropy on the teacher's argmax token there (dense and chunked). sft-reuse: its trainer trains on
exactly pi_sft's own SFT data (the world's sft-data stage), charges nothing, and its loss and gradient are the
completion-token cross-entropy of that data. A planted bug (the argmax target replaced by the sampled token) is
caught.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from opd_bench.config import load_config

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.worlds import load_world, training_prompts

    tmp = tmp_path_factory.mktemp("controls")
    base = [f"runs_dir={tmp}", "world.hf.dtype=float64", "train.batch_size=8"]
    cfg = load_config("smoke", base)
    world = load_world(cfg)
    tokenizer = load_tokenizer(world.tokenizer)
    prompts = training_prompts(cfg, 8, "controls")
    env = {"base": base, "cfg": cfg, "world": world, "tokenizer": tokenizer, "tmp": tmp,
           "load": lambda path: load_model(path, cfg)}
    generator = _trainer(env, "full-kl")
    torch.manual_seed(0)
    batch = generator._generate_and_score_completions([{"prompt": [{"role": "user", "content": p}]} for _, p in prompts])
    env["batch"] = {k: v for k, v in batch.items() if k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                             "completion_mask", "num_items_in_batch")}
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    n = batch["completion_ids"].shape[1]
    env["tokens"], env["mask"] = batch["completion_ids"], batch["completion_mask"].bool()
    assert env["mask"].sum() > 20 and (~env["mask"]).any()  # some padding: the mask matters

    def logits(model):  # the reference's own forward: full logits at the positions predicting the completion
        out = model(input_ids=ids, attention_mask=attention).logits[:, -n - 1:-1]
        assert out.dtype == torch.float64
        return out

    env["logits"] = logits
    with torch.no_grad():
        env["T"] = logits(env["load"](world.teacher_a))
    return env


def _trainer(env, method, overrides=()):
    from datasets import Dataset

    from opd_bench.logprobs import use_chunked
    from opd_bench.resolve import resolve
    from opd_bench.trainer import OPDTrainer, opd_args
    from opd_bench.training import teacher_of

    r = resolve(load_config("smoke", [*env["base"], *overrides]), method)
    world = env["world"]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1"}]] * 8})
    return OPDTrainer(model=env["load"](world.student), teacher_model=env["load"](teacher_of(r, world)),
                      args=opd_args(r.cfg, r.data, env["tmp"] / "work"), train_dataset=data,
                      processing_class=env["tokenizer"], method=r.method, params=r.params, data=r.data,
                      chunked=use_chunked(r.cfg))


def _through_trainer(env, method, overrides=()):
    trainer = _trainer(env, method, overrides)
    batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in env["batch"].items()}
    batch = trainer.score_batch(batch)
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), _grad(trainer.model), trainer


def _grad(model):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in model.parameters()])


def _reference(env, model, loss_fn):
    model.zero_grad()
    value, surrogate = loss_fn(env["logits"](model))
    surrogate.backward()
    return value.detach(), _grad(model)


def _close(loss, grad, value, ref_grad, tol=1e-9):
    assert grad.abs().max() > 0
    scale = max(1.0, ref_grad.abs().max().item())
    assert abs(loss.item() - value.item()) <= tol * max(1.0, abs(value.item())), (loss.item(), value.item())
    assert (grad - ref_grad).abs().max().item() <= tol * scale, (grad - ref_grad).abs().max().item()


def _check(env, method, overrides, formula, tol=1e-9):
    loss, grad, trainer = _through_trainer(env, method, overrides)
    value, ref_grad = _reference(env, env["load"](env["world"].student), formula)
    _close(loss, grad, value, ref_grad, tol)
    return loss, trainer


# --- the formulas -------------------------------------------------------------------------------------------------


def forward_kl(env):
    def f(s):
        ls, lt = torch.log_softmax(s, -1), torch.log_softmax(env["T"], -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)  # KL(pT || pS) at every position of the student's own samples
        value = (kl * env["mask"]).sum() / env["mask"].sum()
        return value, value
    return f


def argmax_ce(env, target=None):
    def f(s):
        a = env["T"].argmax(-1) if target is None else target  # the teacher's most likely token at each state
        lp = torch.log_softmax(s, -1).gather(-1, a.unsqueeze(-1)).squeeze(-1)
        value = -(lp * env["mask"]).sum() / env["mask"].sum()
        return value, value
    return f


# --- dagger-sft -----------------------------------------------------------------------------------------------------


def test_dagger_sft_forward_kl_at_every_position_of_the_students_samples(env):
    loss, trainer = _check(env, "dagger-sft", (), forward_kl(env))
    assert trainer.data.reads.teacher_distribution and not trainer.data.reads.teacher_logp


def test_dagger_sft_argmax_is_the_cross_entropy_on_the_teachers_token(env):
    a, mask = env["T"].argmax(-1), env["mask"]
    differs = (a != env["tokens"]) & mask
    assert 0 < differs.sum() < mask.sum()  # the teacher's token is not the sample everywhere: the case differs from SFT
    loss, trainer = _check(env, "dagger-sft", ["method.params.target=argmax"], argmax_ce(env))
    fkl, _ = _check(env, "dagger-sft", (), forward_kl(env))
    assert abs(loss.item() - fkl.item()) > 1e-3
    assert trainer.cost.tokens_scored == int(env["batch"]["prompt_mask"].sum() + env["mask"].sum())  # the teacher ran
    assert trainer.cost.train_flops > 0


def test_dagger_sft_argmax_dense_and_chunked_agree(env):
    dense, g_dense, _ = _through_trainer(env, "dagger-sft", ["method.params.target=argmax"])
    chunked, g_chunked, _ = _through_trainer(env, "dagger-sft", ["method.params.target=argmax", "train.logits=chunked"])
    assert abs(dense.item() - chunked.item()) < 1e-6 * max(1.0, abs(dense.item()))
    assert (g_dense - g_chunked).abs().max().item() < 1e-6 * max(1.0, g_dense.abs().max().item())


def test_planted_argmax_replaced_by_the_sample_is_caught(env, monkeypatch):
    import opd_bench.methods.dagger_sft as D

    monkeypatch.setattr(D, "teacher_argmax", lambda s: s.tokens)  # the bug: plain SFT on the student's own samples
    with pytest.raises(AssertionError):
        _check(env, "dagger-sft", ["method.params.target=argmax"], argmax_ce(env))


def test_controls_are_registered_with_their_help_and_validated():
    from opd_bench.errors import UserError
    from opd_bench.methods.base import get

    for name in ("dagger-sft", "sft-reuse"):
        m = get(name)
        assert m.rule and m.paper and m.doc
        assert m.Params.model_fields and all(f.description for f in m.Params.model_fields.values()), name
    method = get("dagger-sft")
    assert method.label(method.params({"target": "argmax"})) == "dagger-sft [target=argmax]"
    with pytest.raises(UserError, match="target"):
        method.params({"target": "reverse"})


# --- sft-reuse ------------------------------------------------------------------------------------------------------


def _context(env, overrides=()):
    from opd_bench.ledger import Ledger
    from opd_bench.training import TrainContext

    cfg = load_config("smoke", [*env["base"], *overrides])
    return TrainContext(cfg, env["world"], env["tokenizer"], env["world"].teacher_a, env["tmp"] / "reuse",
                        Ledger(env["tmp"] / "reuse-ledger.json"))


def test_sft_reuse_trains_on_pi_sfts_own_data_and_charges_nothing(env):
    from opd_bench.methods.base import get
    from opd_bench.micro.world import load_sft_data
    from opd_bench.sft import tokenize_pairs

    world = env["world"]
    assert world.sft_data and Path(world.sft_data).name.startswith("sft-data-")
    own = load_sft_data(Path(world.sft_data))
    method = get("sft-reuse")
    for rows in (None, 5):
        ctx = _context(env)
        trainer = method.trainer(ctx, method.params({} if rows is None else {"rows": rows}))
        n = len(own) if rows is None else rows
        expected = tokenize_pairs(env["tokenizer"], own["prompt"][:n], own["completion"][:n])
        assert trainer.train_dataset["input_ids"] == expected["input_ids"]
        assert trainer.train_dataset["labels"] == expected["labels"]
        assert ctx.charged == []  # already paid: the world's build sampled these
    assert method.data(method.params()).reads.teacher_distribution is False


def test_sft_reuse_loss_is_the_completion_cross_entropy(env):
    from opd_bench.methods.base import get

    method = get("sft-reuse")
    trainer = method.trainer(_context(env), method.params())
    inputs = next(iter(trainer.get_train_dataloader()))
    labels = inputs["labels"]
    assert (labels == -100).any() and (labels != -100).any()  # the prompt is kept out of the loss
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grad = _grad(model)

    ref = env["load"](env["world"].student)
    ref.zero_grad()
    logits = ref(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")).logits[:, :-1]
    assert logits.dtype == torch.float64
    target, keep = labels[:, 1:], labels[:, 1:] != -100
    lp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    value = -(lp * keep).sum() / keep.sum()
    value.backward()
    # float32-exact, not float64: TRL's SFTTrainer computes the log-probs in its fused lm-head kernel in float32
    _close(loss.detach(), grad, value.detach(), _grad(ref), tol=1e-6)


def test_sft_reuse_refuses_a_world_without_sft_data_and_too_many_rows(env):
    from dataclasses import replace

    from opd_bench.errors import UserError
    from opd_bench.methods.base import get

    method = get("sft-reuse")
    ctx = _context(env)
    ctx.world = replace(env["world"], sft_data=None)
    with pytest.raises(UserError, match="SFT data"):
        method.trainer(ctx, method.params())
    with pytest.raises(UserError, match="rows"):
        method.trainer(_context(env), method.params({"rows": 10**6}))
    with pytest.raises(UserError):
        method.params({"rows": 0})
