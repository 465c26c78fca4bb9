"""The steps of benchmarks/gpu_check.sh (a lent GPU, ~15 minutes, no network): each prints one JSON line of results.

  env              versions, the GPU, which of vLLM / DeepSpeed are installed
  run M [--tag T]  `opd-bench run` of method M on the smoke preset (tiny random Qwen3s trained on the spot, no
                   downloads), 3 OPD steps; under `accelerate launch` this is the FSDP2 / ZeRO-3 run. Prints train
                   tokens/s, generated tokens/s and the peak GPU memory of this process
  vllm-lifecycle   an evaluation on vLLM (its engine in a child process), then in the same process an HF load and
                   a tensor of 80% of the free memory: the engine's memory was returned
  vllm-held        an engine held in this process (as TRL's colocated one, sleep mode): an evaluation of another
                   checkpoint reuses it (weights loaded, woken, put back to sleep), no second engine
Results also go to $OUT/gpu_check/<step>.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORK = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check_work"))


def emit(step: str, data: dict) -> None:
    line = json.dumps({"step": step, **data}, default=str)
    print("RESULT " + line, flush=True)
    out = os.environ.get("OUT")
    if out and int(os.environ.get("RANK", "0")) == 0:
        folder = Path(out) / "gpu_check"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{step}.json").write_text(line)


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def gpu_peak() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": False}
    free, total = torch.cuda.mem_get_info()
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 3),
            "free_gb": round(free / 1e9, 2), "total_gb": round(total / 1e9, 2)}


def env_step() -> None:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "vllm": have("vllm"), "deepspeed": have("deepspeed")}
    for name in ("vllm", "deepspeed", "trl", "transformers", "accelerate"):
        try:
            from importlib.metadata import version

            info[f"{name}_version"] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            pass
    emit("env", info)


def smoke_sets(tag: str, extra: list[str]) -> list[str]:
    return [f"artifacts_dir={WORK / 'artifacts'}", f"runs_dir={WORK / 'runs' / tag}",
            f"leaderboard={WORK / 'runs' / tag / 'lb.csv'}", "train.max_steps=3", "eval.curve=[]",
            "eval.tasks=[micro-math]", "eval.n_per_split=2", "train.checkpoint_seconds=100000", *extra]


def run_step(method: str, tag: str, extra: list[str]) -> None:
    import torch

    from opd_bench.config import load_config
    from opd_bench.run import run

    cfg = load_config("smoke", smoke_sets(tag, extra))
    start = time.perf_counter()
    metrics = run(cfg, method, budget_spec="30m")
    wall = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")):
        return
    ledger = json.loads((Path(cfg.runs_dir) / metrics["run_id"] / "ledger.json").read_text())
    train = [s for s in ledger if s["stage"] == "train"][-1]
    seconds = max(train["wall_seconds"], 1e-9)
    emit(tag, {"method": method, "status": metrics["status"], "steps": metrics["steps"], "wall_s": round(wall, 1),
               "train_s": round(seconds, 2), "train_tokens_per_s": round(train["tokens_trained"] / seconds, 1),
               "generated_tokens_per_s": round(train["tokens_generated"] / seconds, 1),
               "stages": sorted({s["stage"] for s in ledger}), "devices": train["devices"],
               "cuda": torch.cuda.is_available(), **gpu_peak()})


def tiny_vllm_model(folder: Path, seed: int) -> Path:
    """A random Qwen3 vLLM's attention kernels accept (head_dim 64), with the micro char tokenizer."""
    from opd_bench.micro.models import new_model
    from opd_bench.micro.tokenizer import build_char_tokenizer

    if not (folder / "config.json").exists():
        tokenizer = build_char_tokenizer()
        new_model(tokenizer, seed=seed, layers=2, hidden=128, heads=2, intermediate=256, max_positions=1024
                  ).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def vllm_lifecycle_step() -> None:
    import torch

    from opd_bench.config import VLLM
    from opd_bench.evaluation import evaluate
    from opd_bench.registry import TASKS

    model = tiny_vllm_model(WORK / "vllm-model", 0)
    torch.cuda.init()
    free_before = torch.cuda.mem_get_info()[0]
    start = time.perf_counter()
    metrics = evaluate(model, TASKS.get("micro-math"), WORK / "vllm-eval", n_per_split=8, k=4, backend="vllm",
                       vllm=VLLM(eval_gpu_memory_utilization=0.5, enforce_eager=True))
    seconds = time.perf_counter() - start
    free_after = torch.cuda.mem_get_info()[0]
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(str(model)).cuda()  # the HF load, in the same process
    block = torch.empty(int(0.8 * free_after) // 4, dtype=torch.float32, device="cuda")  # 80% of what is free
    ok = block.numel() > 0 and net is not None
    del block, net
    emit("vllm-lifecycle", {"engine": metrics["engine"], "eval_s": round(seconds, 1),
                            "generated_tokens": metrics["generated_tokens"],
                            "generated_tokens_per_s_incl_start": round(metrics["generated_tokens"] / seconds, 1),
                            "free_gb_before": round(free_before / 1e9, 2), "free_gb_after": round(free_after / 1e9, 2),
                            "memory_returned": free_after >= free_before - 1e9, "hf_load_and_80pct_alloc": ok})


def vllm_held_step() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, as TRL colocates it
    from types import SimpleNamespace

    import vllm

    from opd_bench import vllm_backend
    from opd_bench.evaluation import evaluate
    from opd_bench.registry import TASKS

    student, checkpoint = tiny_vllm_model(WORK / "vllm-model", 0), tiny_vllm_model(WORK / "vllm-checkpoint", 1)
    llm = vllm.LLM(model=str(student), gpu_memory_utilization=0.3, enable_sleep_mode=True, enforce_eager=True)
    llm.sleep(level=2)
    holder = SimpleNamespace(llm=llm, mode="colocate", enable_sleep_mode=True, _llm_weights_sleeping=True)
    vllm_backend.register(holder)
    start = time.perf_counter()
    metrics = evaluate(checkpoint, TASKS.get("micro-math"), WORK / "vllm-held-eval", n_per_split=8, k=4,
                       backend="vllm")
    seconds = time.perf_counter() - start
    emit("vllm-held", {"engine": metrics["engine"], "eval_s": round(seconds, 1),
                       "generated_tokens_per_s": round(metrics["generated_tokens"] / seconds, 1),
                       "asleep_after": holder._llm_weights_sleeping, "avg@k": metrics["avg@k"], **gpu_peak()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["env", "run", "vllm-lifecycle", "vllm-held"])
    parser.add_argument("--method", default="standard-opd")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config overrides")
    args = parser.parse_args()
    os.environ.setdefault("OPD_BENCH_QUIET", "1")
    if args.step == "env":
        env_step()
    elif args.step == "run":
        run_step(args.method, args.tag or args.method, args.sets)
    elif args.step == "vllm-lifecycle":
        vllm_lifecycle_step()
    else:
        vllm_held_step()


if __name__ == "__main__":
    main()
