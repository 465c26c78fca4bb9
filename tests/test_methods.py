"""Method plugins: axes, overrides, errors, a plugin from a temporary folder, and every built-in OPD method
lowering the student's reverse KL to its teacher on held-out prompts (smoke world, 30-second budget)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from opd_bench.config import load_config
from opd_bench.errors import UserError
from opd_bench.method import Method, resolve
from opd_bench.registry import METHODS

torch.set_num_threads(1)
BUILT_IN = ["exopd", "full-kl", "inconsistent-offline", "lightning-opd", "sft-continue", "standard-opd", "tip", "vopd"]


def test_built_in_methods_are_registered_with_their_axes():
    assert set(BUILT_IN) <= set(METHODS.names())
    axes = {name: resolve(load_config("smoke"), name)[1] for name in BUILT_IN}
    assert axes["lightning-opd"].rollouts == "offline" and axes["lightning-opd"].clip_eps == 0.2
    assert axes["inconsistent-offline"].teacher == "inconsistent"
    assert (axes["exopd"].reward, axes["exopd"].lam, axes["exopd"].reference) == ("exopd", 1.25, "pi_sft")
    assert axes["vopd"].baseline == "vopd" and axes["vopd"].top_k is None
    assert (axes["tip"].tokens, axes["tip"].fraction) == ("entropy", 0.5)
    assert (axes["full-kl"].loss, axes["full-kl"].beta) == ("full-kl", 1.0)
    assert axes["sft-continue"].loss == "sft"
    s = axes["standard-opd"]
    assert (s.rollouts, s.teacher, s.reward, s.baseline, s.tokens, s.loss, s.reward_to_go) == \
        ("online", "consistent", "opd", "none", "all", "pg", False)


def test_any_axis_is_overridden_from_the_command_line():
    cfg = load_config("smoke", ["method.tokens=entropy", "method.fraction=0.2"])
    _, ax = resolve(cfg, "lightning-opd")  # lightning + TIP: no new code
    assert (ax.rollouts, ax.tokens, ax.fraction, ax.clip_eps) == ("offline", "entropy", 0.2, 0.2)
    _, ax = resolve(load_config("smoke", ["method.teacher=inconsistent"]), "standard-opd")
    assert (ax.rollouts, ax.teacher) == ("online", "inconsistent")
    _, ax = resolve(load_config("smoke", ["method.lam=1.5", "method.reward_to_go=true"]), "exopd")
    assert (ax.lam, ax.reward_to_go) == (1.5, True)


@pytest.mark.parametrize("overrides, method, message", [
    (["method.baseline=vopd"], "lightning-opd", "offline"),
    (["method.tokens=q3"], "full-kl", "full-kl"),
    (["method.tokens=top"], "tip", "tokens"),
    (["method.tokenz=q3"], "tip", "did you mean"),
    (["method.ratio=sampler"], "standard-opd", "offline rollouts"),
])
def test_impossible_or_misspelled_axes_are_user_errors(overrides, method, message):
    with pytest.raises(UserError, match=message):
        resolve(load_config("smoke", overrides), method)


def test_unknown_axis_in_a_plugin_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'baseline'"):
        Method("bad", baselin="vopd")


PLUGIN = textwrap.dedent('''
    """Half-reward OPD: a plugin overriding one hook (a test of the plugin API)."""
    from opd_bench.method import Method, register

    class HalfReward(Method):
        def advantage(self, s, ax):
            return 0.5 * super().advantage(s, ax)

    register(HalfReward("half-opd", doc=__doc__))
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
                                     "--set", "eval.tasks=[micro-math]", "--set", "eval.n_per_split=1"])
    cli.main()
    metrics = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    assert metrics["method"] == "half-opd" and metrics["steps"] == 2


# --- every built-in OPD method lowers KL(student || its teacher) on held-out prompts ------------------

CASES = [("standard-opd", []), ("standard-opd", ["method.teacher=inconsistent"]), ("lightning-opd", []),
         ("inconsistent-offline", []), ("exopd", []), ("vopd", []), ("tip", []), ("full-kl", [])]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from opd_bench.hf_world import load_model, load_tokenizer
    from opd_bench.micro.problems import eval_problems
    from opd_bench.run import load_world

    cfg = load_config("smoke")
    world = load_world(cfg)
    prompts = [p.prompt for p in eval_problems("micro-math", 16) + eval_problems("micro-code", 8)]
    tokenizer = load_tokenizer(world.tokenizer)

    def kl(student_dir, teacher_dir):
        from opd_bench.trainer import mean_reverse_kl

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
    teacher = w.teacher_b if metrics["axes"]["teacher"] == "inconsistent" else w.teacher_a
    before = held_out["before"].setdefault(teacher, held_out["kl"](w.student, teacher))
    after = held_out["kl"](Path(cfg.runs_dir) / metrics["run_id"] / "model", teacher)
    print(f"\nKL[{method} {' '.join(overrides)}] before {before:.3f} after {after:.3f} "
          f"({metrics['steps']} steps, {metrics['spent']['device_seconds']:.1f} device-s)")
    assert metrics["spent"]["device_seconds"] <= 30 + 5 and metrics["steps"] >= 1
    assert after < before
