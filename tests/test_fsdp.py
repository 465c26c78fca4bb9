"""FSDP2 on a CPU gloo mesh (2 ranks): the trainer's signals equal the unsharded ones.

torch's FSDP2 (`fully_shard`) runs on gloo; accelerate does not (it turns FSDP on only for GPU-like distributed
types: on CPU its state is MULTI_CPU), so the worker shards the smoke world's student and teacher the way
accelerate's `fsdp2_prepare_model` does for TRANSFORMER_BASED_WRAP (each decoder layer, then the root, resharded
after forward) and hands them to an OPDTrainer built without FSDP. On one fixed batch, in float64, dense and
chunked (TRL's kernels: float32 results): the student's completion log-probs, the teacher's log-probs (the online scoring path and the loss's
own), the per-position KL, the loss (vOPD; full-kl through the divergence kernel) and the gradient equal the
unsharded values. A raw backbone call on the sharded teacher fails (mixed Tensor / DTensor): the bypass the
wrappers avoid.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


class _Recorder:
    """Wraps a method: records the signals its loss read."""

    def __init__(self, method, seen: dict):
        self.method, self.seen = method, seen

    def loss(self, s, p):
        out = self.method.loss(s, p)
        self.seen.update(student_logp=s.student_logp.detach().clone(), loss=out.value.detach().clone())
        for name in ("teacher_logp", "kl"):
            if name in s.__dict__:
                self.seen[name] = s.__dict__[name].detach().clone()
        return out


def _worker(out: str) -> None:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from opd_bench.config import load_config
    from opd_bench.logprobs import hidden_states
    from opd_bench.models import load_model, load_tokenizer
    from opd_bench.resolve import resolve
    from opd_bench.resume import Ranks
    from opd_bench.trainer import OPDTrainer, opd_args
    from opd_bench.worlds import load_world

    torch.set_num_threads(1)
    ranks = Ranks.start()
    cfg = load_config("smoke", ["world.hf.dtype=float64", "train.report_to=none", f"runs_dir={out}"])
    world = ranks.main_first(load_world, cfg)
    resolved = {m: resolve(cfg, m) for m in ("vopd", "full-kl", "standard-opd")}
    r = resolved["vopd"]
    student = load_model(world.student, cfg, role="student", device=None)
    teacher = load_model(world.teacher_a, cfg, device=None).eval().requires_grad_(False)
    trainer = OPDTrainer(model=student, teacher_model=teacher, args=opd_args(r.cfg, r.data, Path(out) / "work"),
                         train_dataset=[{"prompt": "x"}] * 8, processing_class=load_tokenizer(world.tokenizer),
                         method=r.method, params=r.params, data=r.data)
    g = torch.Generator().manual_seed(0)
    B, P, C, V = 4, 6, 5, student.config.vocab_size
    batch = {"prompt_ids": torch.randint(1, V, (B, P), generator=g), "prompt_mask": torch.ones(B, P, dtype=torch.long),
             "completion_ids": torch.randint(1, V, (B, C), generator=g),
             "completion_mask": torch.ones(B, C, dtype=torch.long)}
    batch["prompt_mask"][0, :2] = 0  # left-padded prompt
    batch["completion_mask"][1, 3:] = 0  # a completion that ended early
    batch["num_items_in_batch"] = batch["completion_mask"].sum()

    def measure() -> dict:
        values = {}
        for chunked in (False, True):
            trainer.chunked = chunked
            for name in ("vopd", "full-kl"):
                res, seen = resolved[name], {}
                trainer.method, trainer.params, trainer.data = _Recorder(res.method, seen), res.params, res.data
                trainer.model.zero_grad(set_to_none=True)
                loss = trainer.compute_loss(trainer.model, dict(batch))
                loss.backward()
                grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                         for p in trainer.model.parameters()]
                values[(name, chunked)] = {**seen, "grad": torch.cat([x.flatten() for x in grads]).detach().clone()}
            res = resolved["standard-opd"]
            trainer.data = res.data
            values[("scored", chunked)] = {"teacher_logps": trainer.score_batch(dict(batch))["teacher_logps"].clone()}
        return values

    unsharded = measure()
    mesh = init_device_mesh("cpu", (ranks.world,))
    for model in (student, teacher):  # as accelerate's fsdp2_prepare_model: each decoder layer, then the root
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    assert type(teacher.lm_head.weight).__name__ == "DTensor"
    try:
        hidden_states(teacher, batch["prompt_ids"], batch["prompt_mask"], 1)
        raw = "no error"
    except Exception as exc:  # noqa: BLE001 - what a call that bypasses the wrapper gets
        raw = f"{type(exc).__name__}: {exc}"
    sharded = measure()
    if ranks.main:
        torch.save({"unsharded": unsharded, "sharded": sharded, "raw": raw}, Path(out) / "fsdp.pt")


@pytest.mark.slow
def test_fsdp2_signals_equal_the_unsharded_ones(tmp_path):
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPD_BENCH_QUIET": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).resolve()), "worker", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    got = torch.load(tmp_path / "fsdp.pt")
    assert "DTensor" in got["raw"] or "mixed" in got["raw"], got["raw"]  # the bypass fails; the trainer does not
    unsharded, sharded = got["unsharded"], got["sharded"]
    assert set(unsharded) == set(sharded) and len(unsharded) == 6
    for key, values in unsharded.items():
        wanted = {"scored": {"teacher_logps"}, "vopd": {"student_logp", "teacher_logp", "kl", "loss", "grad"},
                  "full-kl": {"student_logp", "loss", "grad"}}[key[0]]
        assert wanted <= set(values), (key, set(values))
        for name, value in values.items():
            other = sharded[key][name]
            assert other.shape == value.shape and other.dtype == value.dtype, (key, name)
            tol = 1e-5 if value.dtype == torch.float32 else 1e-10  # TRL's chunked kernels return float32
            err = (other - value).abs().max().item()
            assert err <= tol * max(1.0, value.abs().max().item()), (key, name, err)
    assert unsharded[("vopd", False)]["kl"].abs().max() > 0
    assert unsharded[("full-kl", True)]["grad"].abs().max() > 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
    _worker(sys.argv[2])
