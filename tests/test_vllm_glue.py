"""The vLLM glue, with a fake `vllm` package (tests/fixtures/fake_vllm: the real constructors' signatures, a log of
what each engine was given and did, with its process id):

* every setting is a config key and reaches the engine (evaluation engines) or TRL (the trainer's engine);
* hub ids pass unchanged; local folders as absolute paths;
* each engine outside training runs in a child process that has ended before the next stage loads the HF
  teacher (its memory returned), and without the launcher's process-group variables;
* an evaluation while a trainer holds a colocated engine (the curve points) reuses that engine, on the
  checkpoint's weights, woken and put back to sleep: no second engine;
* offline rollouts sharded over 2 ranks (gloo) equal 1 rank, and so do the teacher log-probs scored from them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# TRL imports vLLM's internals when `vllm` is importable: its modules are imported before the fake is on the path.
import opd_bench.trainer  # noqa: F401,E402
import trl.generation.vllm_generation  # noqa: F401,E402
import trl.trainer.utils  # noqa: F401,E402

FAKE = Path(__file__).parent / "fixtures" / "fake_vllm"


@pytest.fixture
def fake_vllm(monkeypatch, tmp_path):
    """The fake on sys.path (spawned children inherit it) and its log; the log's records as a function."""
    monkeypatch.syspath_prepend(str(FAKE))
    log = tmp_path / "vllm-log.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    yield lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("vllm-glue-models")
    return {"student": tiny_model(root / "student", 0), "teacher": tiny_model(root / "teacher", 1),
            "checkpoint": tiny_model(root / "checkpoint", 2)}


def _cfg(tmp_path, *sets):
    from opd_bench.config import load_config

    return load_config("smoke", [f"artifacts_dir={tmp_path / 'artifacts'}", "eval.backend=vllm", *sets])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_settings_reach_the_evaluation_engine_and_trl(fake_vllm, models, tmp_path):
    from opd_bench.evaluation import evaluate
    from opd_bench.registry import TASKS
    from opd_bench.resolve import resolve
    from opd_bench.trainer import opd_args

    cfg = _cfg(tmp_path, "vllm.eval_tensor_parallel=2", "vllm.eval_gpu_memory_utilization=0.55",
               "vllm.max_model_len=400", "vllm.enforce_eager=true", "seed=7")
    card = TASKS.get("micro-math")
    metrics = evaluate(models["student"], card, tmp_path / "eval", n_per_split=2, k=3, max_new_tokens=9,
                       temperature=0.6, seed=cfg.seed, backend="vllm", vllm=cfg.vllm)
    (init,) = [r for r in fake_vllm() if r["event"] == "init"]
    assert init["settings"] == {"model": str(models["student"].resolve()), "tensor_parallel_size": 2, "dtype": "auto",
                                "seed": 7, "gpu_memory_utilization": 0.55, "enforce_eager": True, "max_model_len": 400}
    (gen,) = [r for r in fake_vllm() if r["event"] == "generate"]
    assert gen["params"] == {"n": 3, "temperature": 0.6, "top_p": card.top_p, "max_tokens": 9, "prompt_logprobs": None,
                             "skip_special_tokens": True}
    assert len(set(gen["seeds"])) == gen["requests"] == metrics["n_problems"]  # one seed per prompt
    assert init["pid"] != os.getpid() and metrics["engine"]["engine"] == "own process"
    records = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 * metrics["n_problems"] and all(r["completion_tokens"] <= 9 for r in records)

    # The trainer's engine: every vllm.* training key becomes TRL's argument.
    cfg = _cfg(tmp_path, "train.vllm=true", "vllm.mode=server", "vllm.tensor_parallel=2",
               "vllm.gpu_memory_utilization=0.45", "vllm.sleep=true", "vllm.max_model_len=4353",
               "vllm.server_host=10.0.0.5", "vllm.server_port=8123", "vllm.server_timeout=30")
    r = resolve(cfg, "standard-opd")
    args = opd_args(r.cfg, r.data, tmp_path / "work")
    assert (args.use_vllm, args.vllm_mode, args.vllm_tensor_parallel_size, args.vllm_gpu_memory_utilization,
            args.vllm_enable_sleep_mode, args.vllm_max_model_length, args.vllm_server_host, args.vllm_server_port,
            args.vllm_server_timeout) == (True, "server", 2, 0.45, True, 4353, "10.0.0.5", 8123, 30.0)
    offline = resolve(cfg, "lightning-opd")
    assert not opd_args(offline.cfg, offline.data, tmp_path / "work").use_vllm  # no rollouts to generate


def test_hub_ids_pass_unchanged(fake_vllm, models, tmp_path, monkeypatch):
    from opd_bench import vllm_backend

    monkeypatch.chdir(tmp_path)  # no ./Qwen/Qwen3-8B here: it must not become /tmp/.../Qwen/Qwen3-8B
    assert vllm_backend.model_name("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"
    assert vllm_backend.model_name(models["student"]) == str(models["student"].resolve())
    greedy = vllm_backend.Sampling(n=3, temperature=0.0, max_tokens=4)
    settings = vllm_backend.EngineSettings(gpu_memory_utilization=0.5)
    out, logps = vllm_backend.run_engine("Qwen/Qwen3-8B", settings, [
        vllm_backend.WorkItem(0, [[1, 2, 3]], seeds=[0], sampling=greedy),
        vllm_backend.WorkItem(1, [[5, 6, 7]], completion_ids=[[8, 9]])])  # one engine, two requests
    assert len(out[0]) == 3 and len(set(map(str, out[0]))) == 1  # one greedy sample, repeated n times
    assert logps == [[-0.3, -0.4]]  # prompt_logprobs at the completion's positions (3 and 4) only
    gens = [r for r in fake_vllm() if r["event"] == "generate"]
    assert gens[0]["params"]["n"] == 1 and gens[1]["params"]["prompt_logprobs"] == 0
    (init,) = [r for r in fake_vllm() if r["event"] == "init"]
    assert init["settings"]["model"] == "Qwen/Qwen3-8B"


def test_engines_end_before_the_hf_teacher_loads(fake_vllm, models, tmp_path, monkeypatch):
    """Base evaluation and rollouts on vLLM, then the teacher log-probs on HF: when the teacher loads, every engine's
    process has ended (the memory is back) and this process never imported vllm."""
    from opd_bench import models as model_loading
    from opd_bench import offline
    from opd_bench.evaluation import evaluate
    from opd_bench.registry import TASKS

    monkeypatch.setenv("RANK", "0")  # as under torchrun: the child engines must not see the launcher's variables
    monkeypatch.setenv("MASTER_PORT", "29555")
    cfg = _cfg(tmp_path, "train.rollouts_per_prompt=2")
    evaluate(models["student"], TASKS.get("micro-math"), tmp_path / "eval-base", n_per_split=2, k=1,
             max_new_tokens=6, backend="vllm", vllm=cfg.vllm)
    prompts = [(f"p{i}", f"{i}+{i}=") for i in range(6)]
    rollouts, cost = offline.build_rollouts(cfg, models["student"], models["student"], prompts, shard_rows=4)
    assert cost.tokens_generated > 0 and len(offline.read_manifest(rollouts)["info"]["shards"]) == 3

    seen = []
    real = model_loading.load_model

    def load_model(path, c):
        engines = [r["pid"] for r in fake_vllm() if r["event"] == "init"]
        seen.append((len(engines), [pid for pid in engines if _alive(pid)], "vllm" in sys.modules))
        return real(path, c)

    monkeypatch.setattr(model_loading, "load_model", load_model)
    scored, _ = offline.build_logps(cfg, rollouts, models["teacher"])
    assert seen == [(2, [], False)]  # two engines (eval, rollouts), both ended; vllm never imported here
    inits = [r for r in fake_vllm() if r["event"] == "init"]
    assert all(r["pid"] != os.getpid() and r["launcher_env"] == {} for r in inits)
    data = offline.load_offline(rollouts, {"teacher_logps": scored})
    assert len(data) == 12 and all(len(row["teacher_logps"]) == len(row["completion_ids"]) for row in data)


def test_curve_evaluation_reuses_the_trainers_engine(fake_vllm, models, tmp_path):
    """A live TRL VLLMGeneration (colocate, sleep mode) is found among this process's objects; the evaluation loads
    the checkpoint into it, wakes it, puts it back to sleep and marks its weights for TRL to re-push; the samples
    equal those of an engine of its own on the same checkpoint; no child engine starts."""
    import vllm
    from trl.generation.vllm_generation import VLLMGeneration

    from opd_bench import vllm_backend
    from opd_bench.evaluation import evaluate
    from opd_bench.registry import TASKS

    from transformers import AutoTokenizer

    from opd_bench.generation import prompt_token_ids

    card = TASKS.get("micro-math")
    prompts = [card.render_prompt(p) for p in card.load_problems(2)]
    longest = max(map(len, prompt_token_ids(AutoTokenizer.from_pretrained(models["checkpoint"]), prompts)))
    max_len = longest + 4  # the longest prompts get 4 new tokens, not 8
    generation = VLLMGeneration.__new__(VLLMGeneration)  # what TRL's trainer holds (its __init__ needs a GPU)
    generation.mode, generation.enable_sleep_mode = "colocate", True
    generation.llm = vllm.LLM(model=str(models["student"]), gpu_memory_utilization=0.3, enable_sleep_mode=True,
                              max_model_len=max_len)
    generation.llm.sleep(level=2)
    generation._llm_weights_sleeping = True
    try:
        assert vllm_backend.held_engine() is generation
        held = evaluate(models["checkpoint"], card, tmp_path / "curve", n_per_split=2, k=2, max_new_tokens=8,
                        temperature=1.0, backend="vllm")
        events = fake_vllm()
        assert [r["event"] for r in events if r["event"] in ("init", "wake_up", "load_weights", "generate", "sleep")] \
            == ["init", "sleep", "wake_up", "load_weights", "generate", "sleep"]
        assert {r["pid"] for r in events} == {os.getpid()}  # no second engine, in no other process
        assert generation._llm_weights_sleeping and generation.llm.sleeping
        assert held["engine"]["engine"] == "trainer's colocated vLLM engine"
        assert held["engine"]["clamped"] > 0 and held["engine"]["max_model_len"] == max_len  # max_tokens clamped
        (gen,) = [r for r in events if r["event"] == "generate"]
        assert all(m <= 8 for m in gen["max_tokens"]) and min(gen["max_tokens"]) < 8
    finally:
        generation.llm = None
    # An engine of its own on the checkpoint (the same max_model_len): the same samples.
    from opd_bench.config import VLLM

    own = evaluate(models["checkpoint"], card, tmp_path / "own", n_per_split=2, k=2, max_new_tokens=8,
                   temperature=1.0, backend="vllm", vllm=VLLM(max_model_len=max_len))
    assert own["engine"]["engine"] == "own process"

    def texts(folder):
        return [json.loads(line)["completion"] for line in (folder / "samples.jsonl").read_text().splitlines()]

    assert texts(tmp_path / "curve" / "") == texts(tmp_path / "own")


def test_an_engine_that_cannot_run_the_model_is_left_alone(fake_vllm, models, tmp_path):
    """A held engine of another architecture (e.g. after training, a teacher's samples) is not touched: the
    evaluation gets an engine of its own."""
    import vllm

    from opd_bench import vllm_backend
    from opd_bench.micro.models import new_model
    from opd_bench.micro.tokenizer import build_char_tokenizer

    other = tmp_path / "other"
    tokenizer = build_char_tokenizer()
    new_model(tokenizer, seed=0, layers=2, hidden=32, heads=2, intermediate=64).save_pretrained(other)
    holder = type("Holder", (), {})()
    holder.llm, holder.mode = vllm.LLM(model=str(other)), "colocate"
    vllm_backend.register(holder)
    try:
        assert not vllm_backend.can_run(holder.llm, models["student"])
        results, where = vllm_backend.generate(models["student"], [[5, 6, 7]], vllm_backend.Sampling(max_tokens=3),
                                               [0])
        assert where["engine"] == "own process" and len(results[0]) == 1
        assert not [r for r in fake_vllm() if r["event"] == "load_weights"]
    finally:
        holder.llm = None


RANKS_SCRIPT = r'''
import json, sys


def main():  # under a __main__ guard: the engines' children (spawn) import this file again
    import torch.distributed as dist
    dist.init_process_group("gloo")
    import trl.trainer.utils  # noqa: F401  (before the fake vllm is importable: see the test module)
    from opd_bench import offline
    from opd_bench.config import load_config
    student, teacher, artifacts, fake = sys.argv[1:5]
    sys.path.insert(0, fake)  # the engines' children (spawn) get this path
    cfg = load_config("smoke", [f"artifacts_dir={artifacts}", "eval.backend=vllm", "train.rollouts_per_prompt=2"])
    prompts = [(f"p{i}", f"{i}*{i}=") for i in range(10)]
    rollouts, cost = offline.build_rollouts(cfg, student, student, prompts, shard_rows=4, collective=True)
    scored, cost2 = offline.build_logps(cfg, rollouts, teacher, collective=True)
    if dist.get_rank() == 0:
        print(json.dumps({"rollouts": str(rollouts), "scored": str(scored), "devices": [cost.devices, cost2.devices]}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
'''


def test_rollouts_sharded_over_two_ranks_equal_one_rank(fake_vllm, models, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): rank r samples shards r, r+2, ... on an engine of its own (a child seeing
    only its GPU), scores the same shards with the HF teacher; rank 0 writes the manifests. Same data as 1 rank."""
    from opd_bench import offline

    cfg = _cfg(tmp_path / "one", "train.rollouts_per_prompt=2")
    prompts = [(f"p{i}", f"{i}*{i}=") for i in range(10)]
    one, _ = offline.build_rollouts(cfg, models["student"], models["student"], prompts, shard_rows=4)
    one_scored, _ = offline.build_logps(cfg, one, models["teacher"])

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script), str(models["student"]), str(models["teacher"]),
                           str(tmp_path / "two" / "artifacts"), str(FAKE)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    two, two_scored = Path(out["rollouts"]), Path(out["scored"])
    assert two.name == one.name and two_scored.name == one_scored.name  # the same cache keys
    for a, b in ((one, two), (one_scored, two_scored)):
        info_a, info_b = offline.read_manifest(a)["info"], offline.read_manifest(b)["info"]
        assert info_a["checksum"] == info_b["checksum"] and info_a["shards"] == info_b["shards"]
    assert out["devices"] == [2, 2]
    assert offline.load_offline(two, {"teacher_logps": two_scored}).to_dict() == \
        offline.load_offline(one, {"teacher_logps": one_scored}).to_dict()
    inits = [r for r in fake_vllm() if r["event"] == "init"]
    two_ranks = inits[1:]  # the first engine is the 1-rank build's
    assert sorted(r["cuda_visible_devices"] for r in two_ranks) == ["0", "1"]  # one GPU each
    assert all(r["launcher_env"] == {} for r in two_ranks)  # not RANK/WORLD_SIZE/MASTER_PORT of the job
