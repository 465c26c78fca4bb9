"""Method plugins: parameters, overrides, errors, composition, a plugin from a temporary folder, and every
built-in OPD method lowering the student's reverse KL to its teacher on held-out prompts (smoke world)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from opd_bench.config import load_config
from opd_bench.errors import UserError
from opd_bench.registry import METHODS
from opd_bench.resolve import resolve

torch.set_num_threads(1)
BUILT_IN = ["clipped-opd", "dagger-sft", "exopd", "full-kl", "inconsistent-offline", "lightning-opd", "sft-continue",
            "sft-reuse", "standard-opd", "tip", "vopd"]


def _resolve(method, overrides=()):
    return resolve(load_config("smoke", list(overrides)), method)


def test_built_in_methods_are_registered_with_their_parameters():
    assert set(BUILT_IN) <= set(METHODS.names())
    r = {name: _resolve(name) for name in BUILT_IN}
    assert r["lightning-opd"].data.rollouts.value == "offline" and r["lightning-opd"].params.clip_eps == 0.2
    assert r["inconsistent-offline"].data.teacher.value == "inconsistent" and r["inconsistent-offline"].uses_teacher_b
    assert (r["exopd"].params.lam, r["exopd"].params.reference) == (1.25, "pi_sft")
    assert r["exopd"].data.reads.reference_logp and r["exopd"].data.reference == "pi_sft"
    assert r["vopd"].params.top_k is None and r["vopd"].data.reads.teacher_distribution
    assert (r["tip"].params.rule, r["tip"].params.fraction, r["tip"].params.loss) == ("entropy", 0.5, "reverse-kl")
    assert r["tip"].data.reads.entropy and r["tip"].data.reads.teacher_distribution
    assert r["full-kl"].params.beta == 1.0 and r["clipped-opd"].params.c == 2.0
    s = r["standard-opd"]
    assert (s.data.rollouts.value, s.data.teacher.value, s.params.reward_to_go) == ("online", "consistent", False)
    assert all(x.label == name and x.params_changed == {} for name, x in r.items())
    for name in BUILT_IN:  # every parameter has its help text, from the field's docstring
        method = r[name].method
        assert method.rule and method.paper and method.doc
        assert all(f.description for f in method.Params.model_fields.values()), name


def test_parameters_are_overridden_from_the_command_line_and_recorded_in_the_label():
    r = _resolve("exopd", ["method.params.lam=1.5", "method.params.rollouts=offline"])
    assert (r.params.lam, r.data.rollouts.value) == (1.5, "offline")
    assert r.params_changed == {"rollouts": "offline", "lam": 1.5} and r.label == "exopd [rollouts=offline,lam=1.5]"
    assert r.cfg.method.params["lam"] == 1.5 and r.cfg.method.params["clip_eps"] == 0.2  # every value resolved
    assert _resolve("exopd", ["method.params.lam=1"]).data.reads.reference_logp is False  # lam 1: no reference
    # The method's own value set again is the same experiment (same run key, same label).
    assert _resolve("exopd", ["method.params.lam=1.25"]).key == _resolve("exopd").key != r.key


def test_composition_lightning_rollouts_with_tips_token_rule_needs_no_code():
    r = _resolve("tip", ["method.params.rollouts=offline", "method.params.loss=sampled", "method.params.clip_eps=0.2",
                         "method.params.rule=soft-or"])
    assert r.data.rollouts.value == "offline" and not r.data.reads.teacher_distribution
    assert r.data.reads.teacher_logp and r.data.reads.entropy  # d_t offline: the sampled-token estimate
    r = _resolve("standard-opd", ["method.params.teacher=inconsistent"])  # the online inconsistent arm
    assert r.uses_teacher_b and r.data.rollouts.value == "online"


@pytest.mark.parametrize("overrides, method, message", [
    (["method.params.rollouts=offline"], "vopd", "offline"),
    (["method.params.rollouts=offline"], "tip", "loss=sampled"),
    (["method.params.clip_eps=0.2"], "tip", "loss=sampled"),
    (["method.params.rule=top"], "tip", "rule"),
    (["method.params.rul=q3"], "tip", "did you mean 'rule'"),
    (["method.params.lam=0"], "exopd", "lam"),
    (["method.params.ratio=sampler"], "standard-opd", "offline rollouts"),
    (["method.params.rule=q3"], "full-kl", "no parameter 'rule'"),
    (["method.params.c=-1"], "clipped-opd", "method.params.c"),
])
def test_impossible_or_misspelled_parameters_are_user_errors(overrides, method, message):
    with pytest.raises(UserError, match=message):
        _resolve(method, overrides)


def test_an_unknown_method_is_a_user_error_with_a_suggestion():
    with pytest.raises(UserError, match="did you mean 'standard-opd'"):
        _resolve("standrd-opd")


PLUGIN = textwrap.dedent('''
    """Half-reward OPD: a plugin that reuses standard OPD's advantage (a test of the plugin API)."""
    from pydantic import Field

    from opd_bench.methods.base import register
    from opd_bench.methods.standard_opd import Params as StandardParams
    from opd_bench.methods.standard_opd import StandardOPD


    class Params(StandardParams):
        scale: float = Field(0.5, gt=0)
        """the factor on the advantage"""


    class HalfReward(StandardOPD):
        name = "half-opd"
        paper = "a test"
        rule = "scale * r_t"
        Params = Params

        def loss(self, s, p):
            return self.policy_gradient(s, p, p.scale * self.advantage(s, p))


    register(HalfReward())
''')


@pytest.mark.slow
def test_a_method_in_a_plugin_folder_is_listed_and_runs(tmp_path, monkeypatch, capsys):
    from opd_bench import cli

    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "half_opd.py").write_text(PLUGIN)
    monkeypatch.setenv("OPD_BENCH_PLUGIN_PATH", str(tmp_path / "plugins"))
    monkeypatch.setattr("sys.argv", ["opd-bench", "list"])
    cli.main()
    assert "half-opd" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["opd-bench", "run", "--method", "half-opd", "--budget", "30s", "--preset", "smoke",
                                     "--set", f"runs_dir={tmp_path}/runs", "--set", f"leaderboard={tmp_path}/lb.csv",
                                     "--set", "train.max_steps=2", "--set", "eval.curve=[]",
                                     "--set", "method.params.scale=0.25",
                                     "--set", "eval.tasks=[micro-math]", "--set", "eval.n_per_split=1"])
    cli.main()
    metrics = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert metrics["method"] == "half-opd" and metrics["steps"] == 2 and metrics["label"] == "half-opd [scale=0.25]"


# --- every built-in OPD method lowers KL(student || its teacher) on held-out prompts ------------------

CASES = [("standard-opd", []), ("standard-opd", ["method.params.teacher=inconsistent"]), ("lightning-opd", []),
         ("inconsistent-offline", []), ("exopd", []), ("vopd", []), ("tip", []), ("full-kl", []), ("clipped-opd", [])]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.micro.problems import eval_problems
    from opd_bench.worlds import load_world

    cfg = load_config("smoke")
    world = load_world(cfg)
    prompts = [p.prompt for p in eval_problems("micro-math", 16) + eval_problems("micro-code", 8)]
    tokenizer = load_tokenizer(world.tokenizer)

    def kl(student_dir, teacher_dir):
        from opd_bench.logprobs import mean_reverse_kl

        return mean_reverse_kl(load_model(student_dir, cfg), load_model(teacher_dir, cfg), tokenizer, prompts,
                               max_new_tokens=cfg.train.max_new_tokens, seed=123)

    return {"world": world, "kl": kl, "before": {}, "tmp": tmp_path_factory.mktemp("methods")}


@pytest.mark.slow
@pytest.mark.parametrize("method, overrides", CASES, ids=[" ".join([m, *o]) for m, o in CASES])
def test_method_lowers_reverse_kl_to_its_teacher(held_out, method, overrides):
    from opd_bench.run import run

    cfg = load_config("smoke", [f"runs_dir={held_out['tmp']}/runs", f"leaderboard={held_out['tmp']}/lb.csv",
                                "train.max_steps=40", "eval.curve=[]", "eval.tasks=[micro-math]",
                                "eval.n_per_split=1", *overrides])
    metrics = run(cfg, method, "30s")
    w = held_out["world"]
    teacher = w.teacher_b if metrics["params"].get("teacher") == "inconsistent" else w.teacher_a
    before = held_out["before"].setdefault(teacher, held_out["kl"](w.student, teacher))
    after = held_out["kl"](Path(cfg.runs_dir) / metrics["run_id"] / "model", teacher)
    print(f"\nKL[{method} {' '.join(overrides)}] before {before:.3f} after {after:.3f} "
          f"({metrics['steps']} steps, {metrics['spent']['device_seconds']:.1f} device-s)")
    assert metrics["spent"]["device_seconds"] <= 30 + 5 and metrics["steps"] >= 1
    assert after < before
