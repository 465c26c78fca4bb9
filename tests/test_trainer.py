"""OPDTrainer's code paths, pinned on the smoke world in float64.

* offline == online: the loss and gradient of the offline path (rollouts + teacher log-probs stored by
  the offline stages, batch rebuilt from the dataset) equal those of the online path (TRL generation +
  teacher scoring in the trainer) on the same freshly sampled batch;
* gradient accumulation is exact: micro-batches normalized by the global token count sum to the big batch;
* dense and chunked (TRL kernel) signals agree; an all-empty batch gives a finite zero, not NaN.
"""

from __future__ import annotations

import pytest
import torch

from opd_bench.config import load_config

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.worlds import load_world

    tmp = tmp_path_factory.mktemp("trainer")
    cfg = load_config("smoke", [f"runs_dir={tmp}", "world.hf.dtype=float64", "train.batch_size=8"])
    world = load_world(cfg)
    return {"cfg": cfg, "world": world, "tokenizer": load_tokenizer(world.tokenizer), "tmp": tmp,
            "load": lambda path: load_model(path, cfg)}


def _trainer(smoke, method_name, overrides=(), **kw):
    from datasets import Dataset

    from opd_bench.resolve import resolve
    from opd_bench.trainer import OPDTrainer, opd_args
    from opd_bench.worlds import training_prompts

    cfg = load_config("smoke", [f"runs_dir={smoke['tmp']}", "world.hf.dtype=float64", *overrides])
    r = resolve(cfg, method_name)
    prompts = training_prompts(cfg, 16, "test")
    data = kw.pop("dataset", None) or Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for _, p in prompts]})
    online = r.data.rollouts.value == "online"
    return OPDTrainer(model=smoke["load"](smoke["world"].student),
                      teacher_model=smoke["load"](smoke["world"].teacher_a) if online else None,
                      args=opd_args(r.cfg, r.data, smoke["tmp"] / "work"), train_dataset=data,
                      processing_class=smoke["tokenizer"], method=r.method, params=r.params, data=r.data, **kw), cfg


def _loss_and_grad(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])


def _close(a, b, tol):
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), err


def test_offline_loss_equals_online_loss_on_the_same_fresh_batch(smoke):
    from opd_bench import offline
    from opd_bench.cache import build_stage

    online, cfg = _trainer(smoke, "standard-opd")
    prompts = [{"prompt": row["prompt"]} for row in online.train_dataset.select(range(8))]
    torch.manual_seed(0)
    batch = online._generate_and_score_completions(prompts)
    assert batch["teacher_logps"].dtype == torch.float64
    loss_on, grad_on = _loss_and_grad(online, batch)

    # The same tokens, stored the way the rollouts stage stores them, scored by the teacher_logps stage.
    def unpad(ids, mask):
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    def build(folder, cost):
        rows = offline.save_rows(folder, {"problem_id": [str(i) for i in range(8)],
                                          "prompt_ids": unpad(batch["prompt_ids"], batch["prompt_mask"]),
                                          "completion_ids": unpad(batch["completion_ids"], batch["completion_mask"])})
        return {"tokenizer": offline.tokenizer_fingerprint(smoke["tokenizer"]),
                "vocab_size": offline.model_vocab_size(smoke["world"].student), **rows}

    rollouts, _ = build_stage(smoke["tmp"] / "artifacts", "rollouts", {"test": "offline==online"}, build)
    scored, _ = offline.build_logps(cfg.model_copy(update={"artifacts_dir": str(smoke["tmp"] / "artifacts")}),
                                    rollouts, smoke["world"].teacher_a)
    offline.check_tokenizers(smoke["tokenizer"], smoke["world"].student, (smoke["world"].teacher_a,), rollouts)
    data = offline.load_offline(rollouts, {"teacher_logps": scored})
    lightning, _ = _trainer(smoke, "lightning-opd", dataset=data)
    off_batch = lightning._offline_batch([data[i] for i in range(8)])
    _close(off_batch["teacher_logps"], batch["teacher_logps"], 1e-12)
    loss_off, grad_off = _loss_and_grad(lightning, off_batch)
    _close(loss_off, loss_on, 1e-12)
    _close(grad_off, grad_on, 1e-10)
    assert grad_on.abs().max() > 0


def test_gradient_accumulation_is_exact(smoke):
    """Two micro-batches of 4, each normalized by the global count of 8 sequences' tokens, = one batch of 8."""
    online, _ = _trainer(smoke, "standard-opd")
    torch.manual_seed(1)
    batch = online._generate_and_score_completions([{"prompt": r["prompt"]} for r in online.train_dataset.select(range(8))])
    loss_all, grad_all = _loss_and_grad(online, batch)
    halves = [{k: (v[sl] if torch.is_tensor(v) and v.dim() else v) for k, v in batch.items()}
              for sl in (slice(0, 4), slice(4, 8))]
    parts = [_loss_and_grad(online, h) for h in halves]
    _close(parts[0][0] + parts[1][0], loss_all, 1e-12)
    _close(parts[0][1] + parts[1][1], grad_all, 1e-10)


def test_full_kl_arm_is_the_exact_per_state_reverse_kl(smoke):
    """The full-kl arm's loss = sum_t sum_v pS (log pS - log pT) / completion tokens, written out densely here in
    float64 from the two models' logits on the same batch: value and gradient."""
    trainer, _ = _trainer(smoke, "full-kl")
    torch.manual_seed(4)
    batch = trainer._generate_and_score_completions([{"prompt": r["prompt"]} for r in trainer.train_dataset.select(range(8))])
    trainer.model.train()  # TRL normalizes by the global token count in training mode
    loss, grad = _loss_and_grad(trainer, batch)

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    n, mask = batch["completion_ids"].shape[1], batch["completion_mask"].bool()
    student = torch.log_softmax(trainer.model(input_ids=ids, attention_mask=attention).logits[:, -n - 1:-1], -1)
    with torch.no_grad():
        teacher = torch.log_softmax(trainer.teacher_model(input_ids=ids, attention_mask=attention).logits[:, -n - 1:-1], -1)
    assert student.dtype == teacher.dtype == torch.float64
    reverse_kl = ((student.exp() * (student - teacher)).sum(-1) * mask).sum() / mask.sum()
    trainer.model.zero_grad()
    reverse_kl.backward()
    dense_grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    _close(loss, reverse_kl.detach(), 1e-10)
    _close(grad, dense_grad, 1e-10)
    forward_kl = ((teacher.exp() * (teacher - student)).sum(-1) * mask).sum() / mask.sum()
    assert abs(float(forward_kl - reverse_kl)) > 1e-3  # the direction of the KL is pinned too


@pytest.mark.parametrize("method, overrides", [
    ("vopd", []), ("vopd", ["method.params.top_k=5"]), ("tip", ["method.params.rule=soft-or"]),
    ("tip", ["method.params.rule=q3"]), ("tip", ["method.params.loss=sampled"]), ("full-kl", []), ("exopd", []),
])
def test_dense_and_chunked_signals_agree(smoke, method, overrides):
    """TRL's chunked kernels (CPU fallback) give the dense logits' loss and gradient."""
    dense, _ = _trainer(smoke, method, ["train.logits=dense", *overrides], ref_model=smoke["load"](smoke["world"].student))
    chunked, _ = _trainer(smoke, method, ["train.logits=chunked", *overrides], chunked=True,
                          ref_model=smoke["load"](smoke["world"].student))
    torch.manual_seed(2)
    batch = dense._generate_and_score_completions([{"prompt": r["prompt"]} for r in dense.train_dataset.select(range(8))])
    loss_d, grad_d = _loss_and_grad(dense, batch)
    loss_c, grad_c = _loss_and_grad(chunked, batch)
    _close(loss_c, loss_d, 1e-6)
    _close(grad_c, grad_d, 1e-6)


def test_empty_completions_give_zero_loss_not_nan(smoke):
    online, _ = _trainer(smoke, "standard-opd")
    torch.manual_seed(3)
    batch = online._generate_and_score_completions([{"prompt": r["prompt"]} for r in online.train_dataset.select(range(4))])
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    batch["num_items_in_batch"] = batch["completion_mask"].sum()
    loss, grad = _loss_and_grad(online, batch)
    assert loss.item() == 0.0 and torch.isfinite(grad).all()


def test_sampler_ratio_with_clip_is_a_trust_region_around_the_rollouts(smoke):
    """method.ratio=sampler: rho = pS_theta / pi_sft; with PPO-clip, tokens already pushed past 1 + eps in the
    advantage's direction get no gradient (Lightning's own ratio is 1, so it has no such brake)."""
    from datasets import Dataset

    rows = []
    for i in range(4):
        rows.append({"prompt_ids": [2, 10 + i, 3], "completion_ids": [20 + i, 21, 1],
                     "teacher_logps": [0.0, 0.0, 0.0], "sampler_logps": [0.0, 0.0, 0.0]})
    data = Dataset.from_list(rows)
    trainer, _ = _trainer(smoke, "lightning-opd", ["method.params.ratio=sampler"], dataset=data)
    batch = trainer._offline_batch(rows)
    from opd_bench.token_signals import Signals

    current = Signals(trainer, trainer.model, batch, batch["num_items_in_batch"]).student_logp.detach()
    # teacher log-prob 0 > log pS: A > 0 everywhere. Sampler 1 nat below the current model: rho = e > 1.2.
    batch["sampler_logps"] = (current - 1.0).masked_fill(~batch["completion_mask"].bool(), 0)
    loss, grad = _loss_and_grad(trainer, batch)
    assert grad.abs().max() == 0 and loss < 0
    batch["sampler_logps"] = current.masked_fill(~batch["completion_mask"].bool(), 0)  # rho = 1: inside the clip
    _, grad = _loss_and_grad(trainer, batch)
    assert grad.abs().max() > 0
