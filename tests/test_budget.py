"""Budgets: parsing, the stop rule (within one optimizer step), charging of precomputed stages, the GPU price model
and the modeled clock (the same budget, the same steps, whatever the machine's load)."""

from __future__ import annotations

import os

import pytest
import torch

from opd_bench.budget import Budget, BudgetCallback, spend_of, parse_budget
from opd_bench.errors import UserError
from opd_bench.ledger import PRICE, Ledger, StageCost, modeled_seconds

torch.set_num_threads(1)


@pytest.mark.parametrize("text, kind, amount", [
    ("30h", "seconds", 108000.0), ("90m", "seconds", 5400.0), ("45s", "seconds", 45.0),
    ("1.5h", "seconds", 5400.0), ("3e15flop", "flops", 3e15), ("2E12flops", "flops", 2e12),
    ("750ms", "seconds", 0.75),
])
def test_parse_budget(text, kind, amount):
    budget = parse_budget(text)
    assert (budget.kind, budget.amount, budget.spec) == (kind, amount, text)


@pytest.mark.parametrize("text", ["30x", "-1h", "0", "0s", "1e400flop", "", "h", "5 m s", "3e15", None,
                                  "5m:gpu", "5m:", "3e15flop:modeled", "0ms:modeled"])
def test_malformed_budget_is_a_user_error(text):
    with pytest.raises(UserError) as err:
        parse_budget(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, clock, spec, meter", [
    ("5m", "wall", "5m", "device_seconds"),  # the default: measured device time, as before
    ("5m", "modeled", "5m:modeled", "modeled_seconds"),  # the preset's budget_clock
    ("5m:modeled", "wall", "5m:modeled", "modeled_seconds"),  # inline wins
    ("5 m modeled", "wall", "5m:modeled", "modeled_seconds"),
    ("5m:wall", "modeled", "5m:wall", "device_seconds"),
    ("3e15flop", "modeled", "3e15flop", "flops"),  # a FLOP budget has no clock
])
def test_budget_clock(text, clock, spec, meter):
    budget = parse_budget(text, clock=clock)
    assert (budget.spec, budget.meter, budget.amount) == (spec, meter, 3e15 if meter == "flops" else 300.0)
    # a modeled (or explicit) spec names its clock: re-parsed under either preset clock (config, run key, the row's
    # command) it is the same budget; a plain one ('5m', as every budget before clocks) means the preset's clock
    clocks = ("wall", "modeled") if spec != "5m" else ("wall",)
    assert all(parse_budget(budget.spec, clock=c) == budget for c in clocks)


def test_bad_clock_is_a_user_error():
    with pytest.raises(UserError):
        parse_budget("5m", clock="gpu")
    with pytest.raises(ValueError):  # a modeled budget cannot be judged without the modeled seconds
        parse_budget("5m:modeled").spent(1.0, 1.0)


# ----------------------------------------------------------------------------- the price model

def test_modeled_price_of_known_token_counts_by_hand():
    cost = StageCost(stage="train")
    cost.generate(1_000_000, 1000)  # student rollouts: 2 * 1e6 * 1000 = 2e9 decode FLOPs
    cost.score(4_000_000, 3000)  # teacher log-probs: 2 * 4e6 * 3000 = 2.4e10 prefill FLOPs
    cost.train(1_000_000, 1000)  # 6 * 1e6 * 1000 = 6e9 training FLOPs
    assert (cost.decode_flops, cost.prefill_flops, cost.train_flops, cost.flops) == (2e9, 2.4e10, 6e9, 3.2e10)
    # H100 bf16 dense peak 989 TFLOPS; training + prefill at 40% MFU; decode at 40% x 22,282 / 54,543 (SGLang's
    # measured decode / prefill token rates for one model on the same H100 nodes)
    by_hand = (2.4e10 + 6e9) / (989e12 * 0.40) + 2e9 / (989e12 * 0.40 * 22_282 / 54_543)
    assert cost.modeled_seconds == pytest.approx(by_hand, rel=1e-12) == pytest.approx(8.8209e-5, rel=1e-4)
    assert modeled_seconds(cost) == modeled_seconds(cost.to_dict()) == PRICE.seconds(3.2e10, 2e9) == cost.modeled_seconds
    assert PRICE.mfu_decode / PRICE.mfu_prefill == pytest.approx(0.4085, abs=1e-4)
    # a bare FLOP count (or a caller that set `flops` directly, as SFT does) is priced as training / prefill
    assert modeled_seconds(3.2e10) == pytest.approx(3.2e10 / (989e12 * 0.40), rel=1e-12)


def test_ledger_rows_carry_both_clocks_and_old_records_are_classified(tmp_path):
    ledger = Ledger(tmp_path / "ledger.json")
    with ledger.stage("rollouts") as cost:
        cost.generate(1000, 500)
    with ledger.stage("teacher-logps") as cost:
        cost.score(4000, 500)
    row = ledger.stages[0].to_dict()
    assert row["modeled_seconds"] == pytest.approx(1e6 / (989e12 * PRICE.mfu_decode)) and row["device_seconds"] > 0
    again = Ledger(tmp_path / "ledger.json")  # round trip
    assert [s.to_dict() for s in again.stages] == [s.to_dict() for s in ledger.stages]
    total = again.total()
    assert total["modeled_seconds"] == pytest.approx(sum(s.modeled_seconds for s in ledger.stages))
    assert (total["decode_flops"], total["prefill_flops"], total["flops"]) == (1e6, 4e6, 5e6)
    # a record from before FLOPs were kept by kind: a one-kind stage gets its kind, a mixed one stays unclassified
    old = {"stage": "rollouts", "devices": 1, "wall_seconds": 2.0, "tokens_trained": 0, "tokens_generated": 500,
           "tokens_scored": 0, "flops": 1e6, "cached": True, "extra": {}, "device_seconds": 2.0}
    assert StageCost.from_dict(old).decode_flops == 1e6
    mixed = StageCost.from_dict({**old, "tokens_scored": 10})
    assert (mixed.decode_flops, mixed.prefill_flops, mixed.modeled_seconds) == (0.0, 0.0, modeled_seconds(1e6))


# ----------------------------------------------------------------------------- the modeled clock


class _Clock:
    """A fake time.perf_counter: the fake trainer advances it by each step's (simulated) wall time."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _fake_training(budget: Budget, step_seconds, charged=(), max_steps: int = 1000) -> BudgetCallback:
    """An OPD-like loop: every step samples, scores with the teacher and trains on the same seeded token counts
    (they vary by step, but not by load); only its wall time depends on the machine (`step_seconds(step)`)."""
    clock, cost = _Clock(), StageCost(stage="train")
    cb = BudgetCallback(budget, charged=charged, meter=lambda: cost, timer=clock)
    state, control = _State(), _Control()
    cb.on_train_begin(None, state, control)
    for step in range(1, max_steps + 1):
        tokens = 200 + 37 * (step % 5)
        cost.generate(5_000_000, tokens)
        cost.score(40_000_000, tokens + 40)
        cost.train(5_000_000, tokens + 40)
        clock.now += step_seconds(step)
        state.global_step = step
        cb.on_step_end(None, state, control)
        if control.should_training_stop:
            break
    return cb


_LOADS = {"idle": lambda step: 1.0, "busy": lambda step: 1.0 + 1.5 * (step % 3 == 0) + 0.25 * (step % 2)}


def test_modeled_budget_gives_the_same_steps_whatever_the_load():
    budget = parse_budget("5.5ms", clock="modeled")
    runs = {load: _fake_training(budget, seconds) for load, seconds in _LOADS.items()}
    idle, busy = runs["idle"], runs["busy"]
    assert len(idle.steps) == len(busy.steps) > 5
    assert [s["modeled_seconds"] for s in idle.steps] == [s["modeled_seconds"] for s in busy.steps]
    # the last step is the first whose modeled spend reaches the budget
    assert idle.steps[-2]["modeled_seconds"] < budget.amount <= idle.steps[-1]["modeled_seconds"]
    # measured device-seconds are recorded beside the modeled ones at every step, and they differ with the load
    for cb in runs.values():
        assert all({"device_seconds", "modeled_seconds", "flops", "fraction"} <= set(s) for s in cb.steps)
        assert all(s["fraction"] == s["modeled_seconds"] / budget.amount for s in cb.steps)
    assert idle.steps[-1]["device_seconds"] == len(idle.steps) * 1.0 < busy.steps[-1]["device_seconds"]
    spend = busy.spend()  # spend() itself reports both figures
    assert (spend["device_seconds"], spend["modeled_seconds"]) == (busy.steps[-1]["device_seconds"],
                                                                   busy.steps[-1]["modeled_seconds"])


def test_wall_budget_would_stop_at_different_steps_under_load():
    budget = parse_budget("20s")
    idle, busy = (_fake_training(budget, _LOADS[load]) for load in ("idle", "busy"))
    assert len(idle.steps) == 20 and len(busy.steps) < 20
    assert idle.steps[-1]["modeled_seconds"] != busy.steps[-1]["modeled_seconds"]  # recorded there too


def test_modeled_clock_charges_precompute_at_its_price():
    rollouts = StageCost(stage="rollouts", wall_seconds=30.0, extra={"charged": True})
    rollouts.generate(5_000_000, 20_000)
    budget = parse_budget("5.5ms:modeled")
    cb = _fake_training(budget, _LOADS["idle"], charged=[rollouts])
    free = _fake_training(budget, _LOADS["idle"])
    assert cb.charged_modeled_seconds == rollouts.modeled_seconds and cb.charged_seconds == 30.0
    assert len(cb.steps) < len(free.steps)
    assert cb.steps[0]["modeled_seconds"] == pytest.approx(rollouts.modeled_seconds + free.steps[0]["modeled_seconds"])
    # the same sums the end-of-run accounting uses
    spent = spend_of(budget, [rollouts])
    assert (spent["device_seconds"], spent["modeled_seconds"], spent["flops"]) == (30.0, rollouts.modeled_seconds, 2e11)
    assert spent["fraction"] == rollouts.modeled_seconds / budget.amount


class _State:
    global_step = 0


class _Control:
    should_training_stop = False


def test_callback_charges_precompute_and_marks_fractions():
    flops = {"n": 0.0}
    seen = []
    cb = BudgetCallback(Budget("100flop", "flops", 100.0), charged_flops=30.0, meter=lambda: flops["n"],
                        marks=(0.25, 0.5, 0.75), on_mark=lambda mark, spend: seen.append((mark, spend["flops"])))
    state, control = _State(), _Control()
    cb.on_train_begin(None, state, control)
    for step in range(1, 20):
        state.global_step, flops["n"] = step, 10.0 * step
        cb.on_step_end(None, state, control)
        if control.should_training_stop:
            break
    # 30 precharged + 10/step: crosses 100 at step 7, the first step that ends with the budget spent
    assert state.global_step == 7 and cb.steps[-2]["fraction"] < 1 <= cb.steps[-1]["fraction"]
    # 25% was already spent by the precompute: evaluated after the first step; then 50% and 75%
    assert [m for m, _ in seen] == [0.25, 0.5, 0.75] and [f for _, f in seen] == [40.0, 50.0, 80.0]


@pytest.mark.slow
def test_training_stops_within_one_step_of_the_budget(tmp_path):
    """A real OPDTrainer on the smoke world: the last step is the first whose end is past the limit."""
    import time

    from transformers import TrainerCallback

    from opd_bench.config import load_config
    from opd_bench.ledger import Ledger
    from opd_bench.models import load_tokenizer
    from opd_bench.resolve import resolve
    from opd_bench.run import _train
    from opd_bench.training import TrainContext, build_trainer
    from opd_bench.worlds import load_world

    r = resolve(load_config("smoke", [f"runs_dir={tmp_path}"]), "standard-opd")
    world = load_world(r.cfg)
    ctx = TrainContext(r.cfg, world, load_tokenizer(world.tokenizer), world.teacher_a, tmp_path / "work",
                       Ledger(tmp_path / "ledger.json"))
    trainer = build_trainer(ctx, r)

    class StepTimes(TrainerCallback):
        times: list = []

        def on_step_begin(self, args, state, control, **kw):
            self.times.append(time.perf_counter())

    steps = StepTimes()
    trainer.add_callback(steps)
    budget = parse_budget("3s")
    callback, cost = _train(trainer, budget, [], lambda: trainer.cost.flops, None, (), None, 1)
    spends = [s["device_seconds"] for s in callback.steps]
    assert len(spends) >= 3 and spends[-2] < budget.amount <= spends[-1]
    last_step = time.perf_counter() - steps.times[-1]
    assert spends[-1] - budget.amount <= last_step + 0.05
    assert cost.wall_seconds == pytest.approx(callback.train_seconds(), abs=0.5)


@pytest.mark.slow
def test_real_training_on_the_modeled_clock_makes_the_same_steps_under_load(tmp_path):
    """A real OPDTrainer on the smoke world, twice: unloaded (to a step limit), then with every step slowed down
    (a stand-in for a busy machine) under a modeled budget that ends inside step 4. The seeded tokens give the same
    modeled spend at every step, so the loaded run stops at step 4, and its rows record both clocks."""
    import time as clock

    from transformers import TrainerCallback

    from opd_bench.config import load_config
    from opd_bench.models import load_tokenizer
    from opd_bench.resolve import resolve
    from opd_bench.run import _train
    from opd_bench.training import TrainContext, build_trainer
    from opd_bench.worlds import load_world

    class Busy(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.sleep(0.2)

    def train(budget, folder, load):
        r = resolve(load_config("smoke", [f"runs_dir={folder}", "train.max_steps=6"]), "standard-opd")
        world = load_world(r.cfg)
        ctx = TrainContext(r.cfg, world, load_tokenizer(world.tokenizer), world.teacher_a, folder / "work",
                           Ledger(folder / "ledger.json"))
        trainer = build_trainer(ctx, r)
        if load:
            trainer.add_callback(Busy())
        callback, _ = _train(trainer, budget, [], lambda: trainer.cost, None, (), None, 1)
        return callback.steps

    free = train(parse_budget("1h:modeled"), tmp_path / "a", load=False)
    assert len(free) == 6 and all(s["modeled_seconds"] > 0 and s["device_seconds"] > 0 for s in free)
    budget = Budget("smoke:modeled", "seconds", (free[2]["modeled_seconds"] + free[3]["modeled_seconds"]) / 2, "modeled")
    busy = train(budget, tmp_path / "b", load=True)
    assert [s["step"] for s in busy] == [1, 2, 3, 4]
    assert [s["modeled_seconds"] for s in busy] == [s["modeled_seconds"] for s in free[:4]]
    assert [s["flops"] for s in busy] == [s["flops"] for s in free[:4]]
    assert busy[-1]["device_seconds"] > free[3]["device_seconds"]  # measured, beside the modeled


@pytest.mark.slow
def test_two_runs_beside_and_without_a_busy_process_make_the_same_steps(tmp_path):
    """`opd-bench run` on the smoke world with a modeled budget, once on a quiet machine and once beside a process
    that keeps a core busy: the same number of steps and the same modeled spend; both rows record the measured
    device time beside the modeled one."""
    import subprocess
    import sys

    from opd_bench.leaderboard import read_rows

    def run(name: str) -> dict:
        board = tmp_path / f"{name}.csv"
        subprocess.run([sys.executable, "-m", "opd_bench.cli", "run", "--method", "standard-opd", "--preset", "smoke",
                        "--budget", "0.0004ms:modeled", "--set", f"runs_dir={tmp_path}/{name}", "--set",
                        f"leaderboard={board}", "--set", "train.max_steps=100", "--set", "eval.curve=[]", "--set",
                        "eval.tasks=[micro-math]", "--set", "eval.n_per_split=1"], check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return read_rows(board)[0]

    quiet = run("quiet")
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = run("loaded")
    finally:
        busy.kill()
    assert quiet["stopped_by"] == loaded["stopped_by"] == "budget"
    assert 2 <= int(quiet["steps"]) == int(loaded["steps"]) < 100
    assert float(quiet["spent_modeled_s"]) == pytest.approx(float(loaded["spent_modeled_s"]), rel=1e-9)
    assert quiet["budget_clock"] == loaded["budget_clock"] == "modeled"
    assert float(quiet["spent_device_s"]) > 0 and float(loaded["spent_device_s"]) > 0
