"""Run configuration: typed sections, YAML presets and `--set key=value` overrides.

A preset is a YAML file in `opd_bench/presets/` holding overrides of the defaults below (optionally
`extends:` another preset). Command-line `--set section.key=value` overrides come last. Every value
is validated by pydantic; an unknown key, a wrong type or an unknown preset is a `UserError`
(one line, with a did-you-mean), so the CLI exits with code 2 before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd_bench.errors import UserError, did_you_mean

PRESET_DIR = Path(__file__).parent / "presets"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Arch(Section):
    """A Qwen3-style decoder's shape (micro world: trained from scratch)."""

    layers: int = Field(4, ge=1, description="number of transformer layers")
    hidden: int = Field(128, ge=8, description="hidden size")
    heads: int = Field(4, ge=1, description="attention heads (key/value heads are the same)")
    intermediate: int = Field(384, ge=8, description="MLP inner size")


class Training(Section):
    """One supervised (SFT) training stage, run with TRL's SFTTrainer."""

    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="sequences per step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate (cosine decay to 0: annealed)")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps")
    examples: int = Field(64000, ge=1, description="teachers: distinct generated problems (epochs = steps*batch/"
                          "examples); the student trains on world.sft_prompts teacher samples instead")
    eval_every: int | None = Field(None, ge=1, description="early stopping: every this many steps, the loss on "
                                   "held-out teacher samples (world.sft_heldout); training stops after `patience` "
                                   "evaluations without a new best and the best checkpoint is kept (None: all steps)")
    patience: int = Field(5, ge=1, description="early stopping: evaluations without a new best before it stops")

    def key(self) -> dict:
        """The fields that change what this stage trains (the early-stopping ones only when early stopping is on,
        so stage keys of worlds built without it stay as they were)."""
        return self.model_dump(exclude=None if self.eval_every else {"eval_every", "patience"})


class HFWorld(Section):
    """Models and prompts of a paper preset (`world.kind: hf`): Hugging Face ids or local folders."""

    student: str = Field("", description="the student's base model (recorded; OPD starts from sft_student)")
    sft_student: str = Field("", description="pi_sft: the SFT'd student OPD starts from (id or path)")
    teacher: str = Field("", description="teacher A: the teacher that wrote the SFT data (consistent)")
    teacher_b: str = Field("", description="another teacher for the inconsistent arm (optional)")
    tokenizer: str = Field("", description="tokenizer id or path (default: sft_student's)")
    dtype: Literal["auto", "bfloat16", "float32", "float64"] = Field("auto", description="auto: bf16 on GPU, "
                                                                     "fp32 on CPU (float64: exactness tests)")
    prompts: str = Field("", description="training prompts: a datasets id or a local file/folder")
    prompts_split: str = Field("train", description="split of the prompts dataset")
    prompt_field: str = Field("prompt", description="column holding the prompt (text or chat messages)")


class World(Section):
    """The micro world: tokenizer, tasks, teachers A and B, the SFT student."""

    kind: str = Field("micro", description="'micro' builds everything here; 'hf' (paper presets) loads models")
    seed: int = Field(0, description="seed of the shared world (teachers, SFT data, pi_sft); a run's --seed "
                      "varies only the method's sampling and training")
    hf: HFWorld = Field(default_factory=HFWorld)
    teacher: Arch = Field(default_factory=Arch)
    student: Arch = Field(default_factory=lambda: Arch(layers=2, hidden=64, heads=4, intermediate=192))
    teacher_training: Training = Field(default_factory=Training)
    student_training: Training = Field(default_factory=Training)
    math_fraction: float = Field(0.6, ge=0, le=1, description="share of micro-math in training mixes")
    sft_prompts: int = Field(16000, ge=1, description="training prompts teacher A answers for sft_data")
    sft_heldout: int = Field(0, ge=0, description="more prompts teacher A answers, held out of pi_sft's training: "
                             "the loss its early stopping reads (student_training.eval_every)")
    student_seed: int | None = Field(None, description="seed of pi_sft alone (its SFT data's prompts and samples, "
                                     "its init and data order), the teachers unchanged (None: world.seed); how much "
                                     "pi_sft moves with it is the world's own seed spread")
    corrections: float = Field(0.0, ge=0, le=1, description="teachers' micro-math data: share of steps first "
                               "written wrong, then corrected (`46*2=93!92`, the wrong result out of the loss)")
    sft_temperature: float = Field(0.7, ge=0, description="teacher A's sampling temperature for sft_data")
    max_new_tokens: int = Field(128, ge=1, description="generation limit for sft_data")
    sample_batch_size: int = Field(128, ge=1, description="prompts per generate() call when teacher A writes sft_data: "
                                   "sampling on CPU draws per batch, so this is part of the world (not eval.batch_size)")


class Eval(Section):
    """Evaluation protocol defaults (a task card may fix its own k and sampling)."""

    tasks: list[str] = Field(default_factory=lambda: ["micro-math", "micro-code"])
    n_per_split: int | None = Field(None, ge=1, description="limit problems per split (None: the card's)")
    batch_size: int = Field(128, ge=1, description="prompts per generate() call")
    workers: int = Field(2, ge=1, description="processes generating in parallel (one torch thread each)")
    n_per_split_curve: int | None = Field(None, ge=1, description="problems per split of the evaluations at "
                                          "25/50/75% of the budget (None: n_per_split)")
    backend: Literal["hf", "vllm"] = Field("hf", description="generation backend of evaluations and offline "
                                           "sampling (rollouts, teacher samples); vllm: GPU extra, each engine in "
                                           "a child process (its memory returned when it ends), settings in vllm.*")
    curve: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75], description="budget fractions "
                               "evaluated during training (their cost is recorded, not charged)")


class VLLM(Section):
    """vLLM engines (GPU extra). Training rollouts (train.vllm): TRL's engine, colocated in the training processes
    or a `trl vllm-serve` server. Evaluations, offline rollouts and teacher samples (eval.backend=vllm): one engine
    per rank in a child process, ended before the next stage loads models. Curve evaluations (25/50/75%) reuse
    the trainer's colocated engine when it holds one (no second engine beside the trainer). The planner's Layout
    reads the same values: gpu_memory_utilization = vllm_memory, tensor_parallel = vllm_tp, sleep = vllm_sleep,
    eval_gpu_memory_utilization = eval_vllm_memory, eval_tensor_parallel = eval_tp."""

    mode: Literal["colocate", "server"] = Field("colocate", description="training rollouts: an engine inside each "
                                                "training process (colocate) or a `trl vllm-serve` server")
    tensor_parallel: int = Field(1, ge=1, description="colocated engine's tensor parallel size (divides the "
                                 "number of training processes)")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocated engine's share of each "
                                          "training GPU (TRL's default 0.3)")
    sleep: bool = Field(False, description="colocated engine sleeps (weights and KV cache freed) between "
                        "generations, so the optimizer step gets its memory")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + completion an engine accepts "
                                      "(None: the model's own limit); curve evaluations on the colocated engine "
                                      "are clamped to it")
    server_host: str = Field("0.0.0.0", description="mode=server: host of `trl vllm-serve` (TRL's default)")
    server_port: int = Field(8000, ge=1, le=65535, description="mode=server: its port")
    server_timeout: float = Field(240.0, gt=0, description="mode=server: seconds to wait for the server")
    eval_tensor_parallel: int = Field(1, ge=1, description="engines outside training (evaluation, offline "
                                      "rollouts, teacher samples): tensor parallel size, GPUs per engine")
    eval_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="engines outside training: share "
                                               "of each GPU (they have the GPU to themselves)")
    enforce_eager: bool = Field(False, description="no CUDA graphs: faster start, slower decoding (tests)")


class MethodChoice(Section):
    """The method (`--method NAME`) and its own parameters (`--set method.params.NAME=VALUE`), which the
    method's file declares and validates (`opd-bench list --params` shows them)."""

    name: str = Field("", description="the method (opd-bench run --method NAME; `opd-bench list` shows them)")
    params: dict[str, Any] = Field(default_factory=dict, description="the method's parameters (its defaults "
                                   "unless set here); validated by the method when the run is resolved")


class Train(Section):
    """OPD training hyperparameters, shared by every method of a preset (tune for standard-opd only)."""

    lr: float = Field(1e-4, gt=0, description="constant learning rate, the same for every method")
    batch_size: int = Field(32, ge=1, description="sequences per optimizer step (prompts x rollouts_per_prompt)")
    micro_batch_size: int | None = Field(None, ge=1, description="sequences per forward (None: batch_size)")
    rollouts_per_prompt: int = Field(1, ge=1, description="K: completions sampled per prompt")
    max_new_tokens: int = Field(128, ge=1, description="completion length limit")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the student's rollouts")
    prompts: int = Field(20000, ge=1, description="training prompts (online methods cycle through them)")
    math_fraction: float | None = Field(None, ge=0, le=1, description="micro: share of micro-math among the "
                                        "training, rollout and continued-SFT prompts (None: world.math_fraction, "
                                        "the mix the teachers and pi_sft learned)")
    rollout_prompts: int = Field(2048, ge=1, description="offline: prompts pi_sft answers (x K rollouts)")
    max_passes: float = Field(2.0, gt=0, description="offline: stop after this many passes over the "
                              "rollouts (a probe that reused rollouts ~12 times memorised them)")
    sft_prompts: int = Field(4000, ge=1, description="methods that continue SFT: fresh prompts teacher A "
                             "answers (its SFT then cycles through them until the budget is spent)")
    max_steps: int | None = Field(None, ge=1, description="optimizer-step cap (tests, benchmarks)")
    checkpoint_seconds: float = Field(600.0, ge=0, description="save a resumable checkpoint (weights, optimizer, "
                                      "RNG; only the newest is kept) every this many seconds of training; 0: "
                                      "every step. Saving pauses the budget clock")
    max_grad_norm: float = Field(1.0, gt=0)
    logits: Literal["auto", "dense", "chunked"] = Field("auto", description="dense logits (CPU) or TRL's "
                                                        "chunked kernels (never materialize (B,T,V); auto: on GPU)")
    gradient_checkpointing: bool = Field(False, description="GPU only; on CPU it is slower (trl.md)")
    vllm: bool = Field(False, description="online methods generate with vLLM (colocated; GPU extra)")
    logging_steps: int = Field(10, ge=1)
    report_to: str | list[str] = Field("auto", description="experiment tracking of the training logs (the OPD "
                                       "signals: reward, advantage, tokens kept, grad variance): auto = "
                                       "tensorboard when installed, none, or a list (tensorboard, wandb, trackio)")
    teacher_server_url: str = Field("", description="online methods: score with a teacher served by vLLM "
                                    "(`vllm serve` / `trl vllm-serve`, e.g. http://10.0.0.2:8000) instead of one "
                                    "in the training processes; empty: in-process teacher")
    teacher_server_devices: int = Field(0, ge=0, description="GPUs the teacher server holds: charged to the "
                                        "budget with the training GPUs (device time = wall x all of them)")
    teacher_server_topk: int = Field(20, ge=1, description="methods that read the teacher's full distribution "
                                     "get its top-k from a server (an approximation, marked in the row)")
    rank_wait_s: float = Field(86400.0, gt=0, description="under a launcher: how long the other ranks wait for "
                               "rank 0's own work (evaluations, precompute stages) before they give up")


class RunConfig(Section):
    preset: str = "micro"
    seed: int = Field(0, description="seed for everything that samples")
    artifacts_dir: str = Field("artifacts", description="stage cache (models, data), keyed by input hash")
    runs_dir: str = Field("runs", description="one folder per run")
    threads: int = Field(1, ge=1, description="torch threads per process (1 is fastest here; see trl.md)")
    leaderboard: str = Field("leaderboard.csv", description="the CSV every finished run appends a row to")
    budget: str | None = Field(None, description="default --budget: device time (30h, 90m, 45s) or 3e15flop")
    budget_clock: Literal["wall", "modeled"] = Field("wall", description="how device time is counted: measured "
                                                     "(wall x devices) or modeled GPU time from FLOPs (docs/budget.md)")
    world: World = Field(default_factory=World)
    method: MethodChoice = Field(default_factory=MethodChoice)
    train: Train = Field(default_factory=Train)
    eval: Eval = Field(default_factory=Eval)
    vllm: VLLM = Field(default_factory=VLLM)

    def fingerprint(self, *sections: str) -> str:
        """A short hash of the named sections, for stage-cache keys."""
        data = {name: _dig(self.model_dump(), name) for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _dig(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_overrides(name: str, seen: tuple[str, ...] = ()) -> dict:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise UserError(f"unknown preset {name!r}{did_you_mean(name, available_presets())}")
    data = yaml.safe_load(path.read_text()) or {}
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if parent in seen:
        raise UserError(f"preset {name!r} extends itself through {' -> '.join(seen)}")
    return _deep_merge(_preset_overrides(parent, seen + (name,)), data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_path(data: dict, dotted: str, value: Any, model: type[BaseModel]) -> None:
    """Set data[a][b][c] = value for 'a.b.c', checking each key against the model's fields."""
    parts = dotted.split(".")
    node, schema = data, model
    for i, part in enumerate(parts):
        fields = schema.model_fields
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise UserError(f"unknown config key {dotted!r}: no {part!r} in {where}"
                            f"{did_you_mean(part, fields)}; see `opd-bench list --config`")
        if i == len(parts) - 1:
            node[part] = value
            return
        annotation = fields[part].annotation
        if getattr(annotation, "__origin__", None) is dict:  # free-form keys (method.params.*), checked later
            node.setdefault(part, {})[".".join(parts[i + 1:])] = value
            return
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise UserError(f"config key {'.'.join(parts[:i + 1])!r} is a value, not a section; "
                            f"use --set {'.'.join(parts[:i + 1])}=VALUE")
        node = node.setdefault(part, {})
        schema = annotation


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"bad --set {text!r}: expected KEY=VALUE, e.g. --set seed=3")
    key, raw = text.split("=", 1)
    try:  # YAML scalars: 3 -> int, 3e-3 -> float, true -> bool, [a, b] -> list
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(preset: str = "micro", overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    data = _preset_overrides(preset)
    data["preset"] = preset
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value, RunConfig)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UserError(f"bad config value for {key!r}: {err['msg']} (got {err.get('input')!r}); "
                        f"fix the preset or the --set value") from None
