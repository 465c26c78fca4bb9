"""Every named method as assembled, pinned end to end.

For each built-in method, the loss and gradient computed through the real trainer path (OPDTrainer.compute_loss ->
Signals -> the method file's loss) on one fixed batch of the smoke world in float64 equal an independent float64
reference written here from the paper's formula, from the models' own logits (no opd_bench.signals), on a case
where the method differs from standard OPD. The last tests plant the realistic bugs of issue #14 (vOPD's baseline
sign, ExOPD's reference swapped for the teacher, vOPD's top_k ignored, TIP normalized by all tokens) and check
that this comparison catches each one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd_bench.config import load_config

torch.set_num_threads(1)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.worlds import load_world, training_prompts

    tmp = tmp_path_factory.mktemp("method-math")
    base = [f"runs_dir={tmp}", "world.hf.dtype=float64", "train.batch_size=8"]
    cfg = load_config("smoke", base)
    world = load_world(cfg)
    tokenizer = load_tokenizer(world.tokenizer)
    prompts = training_prompts(cfg, 8, "method-math")
    env = {"base": base, "world": world, "tokenizer": tokenizer, "tmp": tmp,
           "load": lambda path: load_model(path, cfg)}
    generator = _trainer(env, "standard-opd")
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
        env["B"] = logits(env["load"](world.teacher_b))
    return env


def _trainer(env, method, overrides=()):
    from datasets import Dataset

    from opd_bench.logprobs import use_chunked
    from opd_bench.resolve import resolve
    from opd_bench.trainer import OPDTrainer, opd_args
    from opd_bench.training import reference_of, teacher_of

    r = resolve(load_config("smoke", [*env["base"], *overrides]), method)
    world = env["world"]
    online = r.data.rollouts.value == "online"
    reference = reference_of(r, world)
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "1+1"}]] * 8})
    return OPDTrainer(model=env["load"](world.student), teacher_model=env["load"](teacher_of(r, world)) if online else None,
                      args=opd_args(r.cfg, r.data, env["tmp"] / "work"), train_dataset=data,
                      processing_class=env["tokenizer"], method=r.method, params=r.params, data=r.data,
                      ref_model=env["load"](reference) if reference and online else None, chunked=use_chunked(r.cfg))


def _through_trainer(env, method, overrides=(), extra=None):
    """Loss and gradient of one micro-batch through the real trainer path."""
    trainer = _trainer(env, method, overrides)
    batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in env["batch"].items()}
    batch.update(extra or {})
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
    """loss_fn(student logits with grad) -> (value, surrogate whose gradient is the method's); on a fresh copy."""
    model.zero_grad()
    value, surrogate = loss_fn(env["logits"](model))
    surrogate.backward()
    return value.detach(), _grad(model)


def _lp(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def _kl(s, t):
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def _entropy(s):
    ls = torch.log_softmax(s, -1)
    return -(ls.exp() * ls).sum(-1)


def _pg(adv, lps, keep, count):
    """The papers' sampled-token loss at IS ratio 1: value -sum A / N, gradient -sum A grad log pS / N."""
    adv = adv.detach() * keep
    return -adv.sum() / count, -(adv * lps).sum() / count


def _top(score, mask, fraction):
    """The top round-half-up(fraction * n) valid positions by score, ties to the earlier position (numpy)."""
    flat, valid = score.detach().reshape(-1).numpy(), np.flatnonzero(mask.reshape(-1).numpy())
    k = max(1, int(np.floor(fraction * len(valid) + 0.5)))
    chosen = valid[np.argsort(-flat[valid], kind="stable")[:k]]
    out = np.zeros(flat.shape, dtype=bool)
    out[chosen] = True
    return torch.from_numpy(out.reshape(mask.shape))


def _close(loss, grad, value, ref_grad, tol=1e-9):
    assert grad.abs().max() > 0
    scale = max(1.0, ref_grad.abs().max().item())
    assert abs(loss.item() - value.item()) <= tol * max(1.0, abs(value.item())), (loss.item(), value.item())
    assert (grad - ref_grad).abs().max().item() <= tol * scale, (grad - ref_grad).abs().max().item()


def _check(env, method, overrides, formula, extra=None, tol=1e-9):
    """The trainer's loss and gradient equal the reference formula's; returns the loss and the trainer."""
    loss, grad, trainer = _through_trainer(env, method, overrides, extra)
    value, ref_grad = _reference(env, env["load"](env["world"].student), formula)
    _close(loss, grad, value, ref_grad, tol)
    return loss, trainer


# --- the formulas, one per method (reference/methods.md) ----------------------------------------------------------


def standard(env, reward_to_go=False):
    def f(s):
        lps, mask = _lp(s, env["tokens"]), env["mask"]
        r = (_lp(env["T"], env["tokens"]) - lps.detach()) * mask
        if reward_to_go:  # G_t = sum_{t' >= t} r_t'
            r = torch.stack([r[:, t:].sum(1) for t in range(r.shape[1])], 1) * mask
        return _pg(r, lps, mask, mask.sum())
    return f


def exopd(env, lam, ref):
    def f(s):
        lps, mask = _lp(s, env["tokens"]), env["mask"]
        lpt, lpr = _lp(env["T"], env["tokens"]), _lp(ref if ref is not None else s.detach(), env["tokens"])
        adv = lam * (lpt - lpr) - (lps.detach() - lpr)
        return _pg(adv, lps, mask, mask.sum())
    return f


def vopd(env, top_k=None):
    def f(s):
        lps, mask, t = _lp(s, env["tokens"]), env["mask"], env["T"]
        sd = s.detach()
        if top_k:  # the student's top-k tokens, both distributions renormalized over them
            idx = sd.topk(top_k, -1).indices
            kl = _kl(sd.gather(-1, idx), t.gather(-1, idx))
        else:
            kl = _kl(sd, t)
        adv = _lp(t, env["tokens"]) - lps.detach() + kl  # A = r - V, V(s_t) = -KL_t
        return _pg(adv, lps, mask, mask.sum())
    return f


def clipped(env, c):
    def f(s):
        lps, mask = _lp(s, env["tokens"]), env["mask"]
        return _pg((_lp(env["T"], env["tokens"]) - lps.detach()).clamp(-c, c), lps, mask, mask.sum())
    return f


def tip(env, rule, fraction=0.5, loss="reverse-kl"):
    def f(s):
        mask, sd, t = env["mask"], s.detach(), env["T"]
        h, d = _entropy(sd), _kl(sd, t)
        if rule == "entropy":
            keep = _top(h, mask, fraction)
        elif rule == "soft-or":
            hv, dv = h[mask].numpy(), d[mask].numpy()
            hv = np.minimum(hv, np.percentile(hv, 98))  # entropy clipped at the batch 98th percentile
            hn, dn = (hv - hv.min()) / (hv.max() - hv.min()), (dv - dv.min()) / (dv.max() - dv.min())
            score = torch.zeros(mask.shape, dtype=torch.float64)
            score[mask] = torch.from_numpy(hn + dn - hn * dn)
            keep = _top(score, mask, fraction)
        else:  # q3: at most the median entropy, above the median divergence
            keep = mask & (h <= np.quantile(h[mask].numpy(), 0.5)) & (d > np.quantile(d[mask].numpy(), 0.5))
        keep = keep & mask
        assert 0 < keep.sum() < mask.sum()
        if loss == "sampled":
            lps = _lp(s, env["tokens"])
            return _pg(_lp(t, env["tokens"]) - lps.detach(), lps, keep, keep.sum())
        value = (_kl(s, t) * keep).sum() / keep.sum()  # the full-vocab reverse KL on the kept positions only
        return value, value
    return f


def full_kl(env):
    def f(s):
        value = (_kl(s, env["T"]) * env["mask"]).sum() / env["mask"].sum()
        return value, value
    return f


# --- each built-in method, where it differs from standard OPD -----------------------------------------------------


def test_standard_opd_and_its_reward_to_go(env):
    _check(env, "standard-opd", (), standard(env))
    _check(env, "standard-opd", ["method.params.reward_to_go=true"], standard(env, reward_to_go=True))


def test_exopd_extrapolates_with_its_reference(env):
    # pref = pi_sft (the student's own initial weights): A = lam (log pT - log pS), 1.25x standard OPD's reward
    loss, _ = _check(env, "exopd", (), exopd(env, 1.25, None))
    std, _ = _check(env, "standard-opd", (), standard(env))
    assert abs(loss.item() - 1.25 * std.item()) < 1e-9
    # reward correction with another reference (teacher B), and another lambda
    _check(env, "exopd", [f"method.params.reference={env['world'].teacher_b}", "method.params.lam=1.5"],
           exopd(env, 1.5, env["B"]))


def test_vopd_full_and_top_k_baselines(env):
    _check(env, "vopd", (), vopd(env))
    _check(env, "vopd", ["method.params.top_k=3"], vopd(env, top_k=3))


def test_clipped_opd_clips_each_reward(env):
    loss, _ = _check(env, "clipped-opd", ["method.params.c=0.3"], clipped(env, 0.3))
    std, _ = _check(env, "standard-opd", (), standard(env))
    assert abs(loss.item() - std.item()) > 1e-3  # the clip is active on this batch


@pytest.mark.parametrize("rule", ["entropy", "soft-or", "q3"])
def test_tip_reverse_kl_on_the_kept_positions(env, rule):
    _check(env, "tip", [f"method.params.rule={rule}"], tip(env, rule))


def test_tip_sampled_token_ablation_and_fraction(env):
    _check(env, "tip", ["method.params.loss=sampled", "method.params.fraction=0.2"], tip(env, "entropy", 0.2, "sampled"))


def test_full_kl_is_the_reverse_kl_at_every_position(env):
    _check(env, "full-kl", (), full_kl(env))


def test_offline_methods_score_with_their_declared_teacher_and_clip(env):
    """Lightning and its inconsistent control train on stored teacher log-probs: A and B respectively. With the
    sampler ratio the PPO clip (eps 0.2) binds: min(rho A, clip(rho, 0.8, 1.2) A), rho = pS / q."""
    tokens, mask = env["tokens"], env["mask"]
    for method, teacher in (("lightning-opd", env["T"]), ("inconsistent-offline", env["B"])):
        lpt = (_lp(teacher, tokens) * mask).detach()
        with torch.no_grad():
            lps0 = _lp(env["logits"](env["load"](env["world"].student)), tokens)
        q = (lps0 - 0.5 * (torch.arange(tokens.shape[1]) % 2)) * mask  # rho = e^0.5 on odd positions: clipped

        def f(s, lpt=lpt, q=q):
            lps = _lp(s, tokens)
            rho = torch.exp(lps - q)
            adv = lpt - lps.detach()
            surrogate = torch.minimum(rho * adv, rho.clamp(0.8, 1.2) * adv) * mask
            return -surrogate.sum() / mask.sum(), -surrogate.sum() / mask.sum()

        _check(env, method, ["method.params.ratio=sampler"], f, extra={"teacher_logps": lpt, "sampler_logps": q})


# --- planted bugs: each must make the comparison above fail --------------------------------------------------------


def test_planted_vopd_baseline_sign_flip_is_caught(env, monkeypatch):
    import opd_bench.signals as S

    monkeypatch.setattr(S, "vopd_advantage", lambda reward, kl: reward - kl)
    with pytest.raises(AssertionError):
        _check(env, "vopd", (), vopd(env))


def test_planted_exopd_reference_swapped_for_the_teacher_is_caught(env, monkeypatch):
    from opd_bench.token_signals import Signals

    monkeypatch.setattr(Signals, "ref_logp", property(lambda s: s.teacher_logp))
    with pytest.raises(AssertionError):
        _check(env, "exopd", [f"method.params.reference={env['world'].teacher_b}"], exopd(env, 1.25, env["B"]))


def test_planted_vopd_top_k_ignored_is_caught(env, monkeypatch):
    from opd_bench.token_signals import Signals

    monkeypatch.setattr(Signals, "topk_kl", lambda s, k: s.kl)
    with pytest.raises(AssertionError):
        _check(env, "vopd", ["method.params.top_k=3"], vopd(env, top_k=3))


def test_planted_tip_normalized_by_all_tokens_is_caught(env, monkeypatch):
    from opd_bench.methods.base import Loss
    from opd_bench.methods.tip import TIP

    def all_token_loss(self, s, p):
        keep = self.keep(s, p) & s.mask
        return Loss(s.divergence_on(keep).sum() / s.num_items, keep)  # the bug: N = all tokens, not the kept

    monkeypatch.setattr(TIP, "loss", all_token_loss)
    with pytest.raises(AssertionError):
        _check(env, "tip", (), tip(env, "entropy"))
