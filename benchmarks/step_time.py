"""Step time of every method relative to TRL's DistillationTrainer (beta = 1), on the same models and batch.

    python benchmarks/step_time.py --preset micro [--steps 20]

All arms are built once (each with its own copy of pi_sft and the preset's shared `train` settings); then,
step after step, every arm runs one full optimizer step (generation, scoring, loss, backward, AdamW) on the
same prompt batch with the same sampling seed, in a rotating order. So every arm generates exactly the same
completions (the learning rate is set to 1e-12: an online step's time is dominated by generating up to the
longest completion, and with real learning the arms' samples would drift apart and the ratio would
measure sampling noise), and contention from other processes falls on all arms alike. Offline arms read
their batch from the rollouts (built or reused first; that cost is charged to their budget, not a step).
Targets (issue #3): standard-opd <= 0.9 x TRL; lightning-opd <= 0.2 x standard-opd.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from opd_bench.config import load_config  # noqa: E402
from opd_bench.ledger import Ledger  # noqa: E402
from opd_bench.models import load_model, load_tokenizer  # noqa: E402
from opd_bench.resolve import resolve  # noqa: E402
from opd_bench.training import TrainContext, build_trainer, teacher_of  # noqa: E402
from opd_bench.worlds import load_world  # noqa: E402

ARMS = [("trl-distillation", []), ("standard-opd", []), ("lightning-opd", []), ("exopd", []), ("vopd", []),
        ("vopd", ["method.params.top_k=16"]), ("tip", []), ("tip", ["method.params.rule=q3"]), ("full-kl", [])]


def build(preset: str, arm: str, overrides: list[str], steps: int, work: Path):
    from datasets import Dataset
    from trl import DistillationTrainer

    from opd_bench.worlds import training_prompts
    from opd_bench.trainer import opd_args

    cfg = load_config(preset, ["train.lr=1e-12", f"train.rollout_prompts={steps * 64}", *overrides])
    world = load_world(cfg)
    tokenizer = load_tokenizer(world.tokenizer)
    if arm != "trl-distillation":
        r = resolve(cfg, arm)
        ctx = TrainContext(r.cfg, world, tokenizer, teacher_of(r, world), work, Ledger(work / "l.json"))
        trainer = build_trainer(ctx, r)
    else:  # TRL's own trainer, beta = 1 (full-vocab reverse KL), the same arguments and data
        r = resolve(cfg, "full-kl")
        prompts = training_prompts(cfg, cfg.train.prompts, "opd")
        data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for _, p in prompts]})
        trainer = DistillationTrainer(model=load_model(world.student, cfg), args=opd_args(r.cfg, r.data, work),
                                      teacher_model=load_model(world.teacher_a, cfg), train_dataset=data,
                                      processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
    return trainer, cfg


def one_step(trainer, rows, seed: int) -> float:
    start = time.perf_counter()
    torch.manual_seed(seed)
    trainer.training_step(trainer.model, rows, None)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [" ".join([a, *o]) for a, o in ARMS]
    with tempfile.TemporaryDirectory() as tmp:
        arms = {name: build(args.preset, a, o, args.steps + 1, Path(tmp)) for name, (a, o) in zip(names, ARMS)}
        cfg = next(iter(arms.values()))[1]
        b = cfg.train.batch_size
        prompts = [{"prompt": r["prompt"]} for r in arms["standard-opd"][0].train_dataset.select(range((args.steps + 1) * b))]
        times: dict[str, list[float]] = {name: [] for name in names}
        for step in range(args.steps + 1):
            order = names[step % len(names):] + names[:step % len(names)]
            for name in order:
                trainer = arms[name][0]
                if trainer.train_dataset is not None and "prompt_ids" in trainer.train_dataset.column_names:
                    rows = [trainer.train_dataset[i] for i in range(step * b, (step + 1) * b)]
                else:
                    rows = prompts[step * b:(step + 1) * b]
                seconds = one_step(trainer, rows, seed=1000 + step)
                if step:  # the first step warms up allocators and caches
                    times[name].append(seconds)
    base = statistics.median(times["trl-distillation"])
    standard = statistics.median(times["standard-opd"])
    print(f"\npreset {args.preset}: batch {b}, max_new_tokens {cfg.train.max_new_tokens}, {args.steps} steps per arm "
          f"(interleaved, identical batches), 1 thread")
    print(f"{'arm':<26}{'median step s':>14}{'/ TRL':>8}{'/ standard':>12}")
    for name, values in times.items():
        m = statistics.median(values)
        print(f"{name:<26}{m:>14.4f}{m / base:>8.2f}{m / standard:>12.2f}")
    print(f"\ntargets: standard-opd / TRL = {standard / base:.2f} (<= 0.9); "
          f"lightning-opd / standard-opd = {statistics.median(times['lightning-opd']) / standard:.2f} (<= 0.2)")


if __name__ == "__main__":
    main()
