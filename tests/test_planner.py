"""The memory planner: model sizes from the shipped config.json fixtures, refusals with a fix, a hand count."""

import json
import subprocess
import sys

import pytest

from opd_bench.config import load_config
from opd_bench.errors import UserError
from opd_bench.planner import (GB, Layout, MethodNeeds, RunShape, check_config, check_fits, load_shape, needs_for,
                               plan_memory, run_shape)

STANDARD_OPD = MethodNeeds()  # online teacher, sampled-token log-probs, student samples with vLLM
LIGHTNING = MethodNeeds(online_teacher=False, offline_rollouts=True, student_generation=False)


def lightning_8b(**kw) -> RunShape:
    """lightning-8b's sizes: Qwen3-8B(-Base) student, Qwen3-32B teacher, micro-batch 2, 4096-token completions."""
    return RunShape(student=load_shape("Qwen/Qwen3-8B-Base"), teacher=load_shape("Qwen/Qwen3-32B"), **{
        "micro_batch": 2, "prompt_tokens": 256, "completion_tokens": 4096, **kw})


@pytest.mark.parametrize("model, total, non_embedding", [
    ("Qwen/Qwen3-1.7B", 1.7e9, 1.4e9),  # the model cards' "Number of Parameters" (total / non-embedding)
    ("Qwen/Qwen3-4B-Base", 4.0e9, 3.6e9),
    ("Qwen/Qwen3-8B-Base", 8.2e9, 6.95e9),
    ("Qwen/Qwen3-8B", 8.2e9, 6.95e9),
    ("Qwen/Qwen3-32B", 32.8e9, 31.2e9),
])
def test_parameter_counts_match_the_published_sizes(model, total, non_embedding):
    shape = load_shape(model)
    assert abs(shape.n_params / total - 1) < 0.02
    embeddings = shape.embedding_params * (1 if shape.tied else 2)
    assert abs((shape.n_params - embeddings) / non_embedding - 1) < 0.02
    assert shape.vocab == 151936


def test_refuses_standard_opd_on_one_gpu_with_a_fix():
    with pytest.raises(UserError) as err:
        check_fits(lightning_8b(), STANDARD_OPD, Layout(gpus=1, gpu_memory_gb=80))
    message = str(err.value)
    assert "\n" not in message and "'train' does not fit" in message and "fix:" in message
    assert "--layout zero3" in message  # the fix names a layout that fits
    train = next(s for s in plan_memory(lightning_8b(), STANDARD_OPD, Layout(gpus=1)) if s.stage == "train")
    assert train.total > 200 * GB  # fp32 states of 8.2B (147 GB) + a bf16 32B teacher (65.5 GB) + vLLM
    # More replicas do not help: DDP on 8 GPUs is refused as well.
    with pytest.raises(UserError, match="ZeRO-3"):
        check_fits(lightning_8b(), STANDARD_OPD, Layout(gpus=8, strategy="ddp"))


@pytest.mark.parametrize("layout", [
    Layout(gpus=8, strategy="zero3"),
    Layout(gpus=8, strategy="fsdp2"),
    Layout(gpus=4, strategy="zero3", teacher="server", server_gpus=4),
])
def test_accepts_layouts_that_fit(layout):
    check_fits(lightning_8b(), STANDARD_OPD, layout)
    stages = {s.stage: s for s in plan_memory(lightning_8b(), STANDARD_OPD, layout)}
    assert all(s.total <= 80 * GB for s in stages.values())
    if layout.teacher == "server":
        assert "teacher server" in stages and "teacher" not in stages["train"].describe()
        assert layout.devices == 8  # the server's GPUs are charged


def test_zero3_train_stage_is_within_15_percent_of_a_hand_count():
    """By hand, lightning-8b standard OPD on 8 x 80 GB ZeRO-3 (micro-batch 2, 256 + 4096 tokens), per GPU:
      student 8.19e9 params x 18 B (bf16 params + grads, fp32 grads, master, Adam m, v) / 8 = 18.4 GB
      teacher 32.76e9 params x 2 B (bf16) / 8                                               =  8.2 GB
      TRL colocated vLLM engine: 0.3 x 80 GB                                                 = 24.0 GB
      peak phase, the teacher scoring 8 rows (8 x 4352 = 34,816 tokens) under no_grad:
        MLP gate, up, act in bf16: 34,816 x 3 x 25,600 x 2 B                                 =  5.3 GB
        chunked logits: 4096 rows x 151,936 x 4 B, twice (logits + softmax)                  =  5.0 GB
        two gathered 778M-param embedding-size modules in bf16                               =  3.1 GB
      CUDA context, NCCL, allocator slack                                                    =  2.0 GB
      total                                                                                  ~ 66.0 GB
    """
    train = next(s for s in plan_memory(lightning_8b(), STANDARD_OPD, Layout(gpus=8, strategy="zero3"))
                 if s.stage == "train")
    assert abs(train.total / GB / 66.0 - 1) < 0.15, train.describe()


def test_one_gpu_hand_count():
    """By hand, 1 x 80 GB (no sharding): 8.19e9 x (16 B fp32 master + grads + Adam, 2 B bf16 autocast copy) = 147.4,
    teacher 65.5, vLLM 24, checkpointed activations 36 x 8704 tokens x 4096 x 4 B = 5.1 (+ one layer recomputed
    ~3.5), chunked loss logits 5.0, overhead 2: ~252 GB."""
    train = next(s for s in plan_memory(lightning_8b(), STANDARD_OPD, Layout(gpus=1)) if s.stage == "train")
    assert abs(train.total / GB / 252.5 - 1) < 0.15


def test_lightning_trains_without_a_teacher_and_precomputes_chunked():
    stages = {s.stage: s for s in plan_memory(lightning_8b(), LIGHTNING, Layout(gpus=8, strategy="zero3"))}
    assert {"rollouts (pi_sft samples)", "teacher precompute", "train"} <= set(stages)
    assert "teacher" not in stages["train"].describe() and stages["train"].fits
    assert stages["teacher precompute"].fits  # 65.5 GB of bf16 32B + chunked scoring on one 80 GB GPU
    dense = {s.stage: s for s in plan_memory(lightning_8b(chunked_logits=False), LIGHTNING, Layout(gpus=8))}
    assert not dense["teacher precompute"].fits  # dense (8 rows x 4096 x 151,936) logits alone are ~50 GB
    check_fits(lightning_8b(), LIGHTNING, Layout(gpus=4, strategy="zero3"))


def test_smaller_micro_batch_is_the_fix_when_activations_overflow():
    run = lightning_8b(micro_batch=8, gradient_checkpointing=False)
    with pytest.raises(UserError, match="micro-batch"):
        check_fits(run, LIGHTNING, Layout(gpus=8, strategy="zero3"))


def test_a_local_folder_config_and_an_unknown_model(tmp_path):
    cfg = json.loads((load_shape.__globals__["CONFIG_DIR"] / "Qwen--Qwen3-4B-Base.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_shape(str(tmp_path)).n_params == load_shape("Qwen/Qwen3-4B-Base").n_params
    with pytest.raises(UserError, match="no config.json"):
        load_shape("nobody/nothing-7B")


def test_needs_come_from_the_methods_declarations():
    cfg = load_config("lightning-8b")
    needs, _ = needs_for(cfg, "standard-opd")
    assert needs.online_teacher and needs.student_generation and not needs.offline_rollouts
    needs, _ = needs_for(cfg, "lightning-opd")
    assert needs.offline_rollouts and not needs.online_teacher
    assert needs_for(cfg, "vopd")[0].teacher_distribution
    run = run_shape(cfg, needs)
    assert run.student.name == "Qwen/Qwen3-8B-Base" and run.teacher.name == "Qwen/Qwen3-32B"  # sft_student unset
    assert run.micro_batch == 2 and run.completion_tokens == 4096
    assert check_config(load_config("micro"), needs, Layout()) == []  # tiny CPU models: nothing to check
    with pytest.raises(UserError):
        check_config(cfg, needs_for(cfg, "standard-opd")[0], Layout(gpus=1))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "opd_bench.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_plan_command_exits_2_with_the_fix_and_0_when_it_fits():
    bad = cli("plan", "--preset", "lightning-8b", "--method", "standard-opd", "--gpus", "1", "--gpu-memory", "80")
    assert bad.returncode == 2, bad.stderr
    assert "train" in bad.stdout and len(bad.stderr.strip().splitlines()) == 1 and "fix:" in bad.stderr
    ok = cli("plan", "--preset", "lightning-8b", "--method", "standard-opd", "--gpus", "8", "--layout", "zero3")
    assert ok.returncode == 0, ok.stderr
    assert "ZeRO-3" in ok.stdout and "teacher" in ok.stdout


def test_layout_of_the_current_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    lay = Layout.detect(teacher="server", server_gpus=4)
    assert (lay.gpus, lay.strategy, lay.devices) == (8, "zero3", 12)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert Layout.detect().strategy == "fsdp2"
