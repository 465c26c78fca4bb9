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
from test_method_math import _check, _close, _grad, _through_trainer, env  # noqa: F401 (env: the shared fixture)

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


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
