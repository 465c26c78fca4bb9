"""Memory planner: per-GPU memory of every stage of a run, from the models' config.json, for a layout.

`opd-bench plan --preset lightning-8b --method standard-opd --gpus 8 --gpu-memory 80 --layout zero3` prints
one row per stage and exits 2 with a one-line fix when a stage cannot fit; `run` makes the same check before
any work (`check_config`). The numbers are estimates from shapes (no weights are read, nothing runs):

  model sizes     from config.json (hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied
                  embeddings): the shipped fixtures of the paper presets' models (data/model_configs), or a
                  local folder's config.json
  training        the student in fp32 master weights with bf16 compute, Adam (fp32 m, v):
                    ddp    16 B/param (4 master + 4 grads + 8 Adam) + 2 (autocast's bf16 weight cache)
                           + 4 (DDP gradient buckets, more than one GPU), replicated on every GPU
                    zero3  18 B/param / N (DeepSpeed's own estimate: bf16 params and grads, fp32 grads,
                           master and Adam) + 4 B x the largest module (gathered whole)
                    fsdp2  16 B/param / N + bf16 embedding and head (the root unit, gathered for the whole
                           step) + 4 B x one decoder layer (bf16 gathered + prefetched)
                  activations of one micro-batch of prompt + completion tokens: every layer's saved tensors
                  (12H + 10q + 10kv + 8I bytes per token: RMSNorm fp32 inputs, q/k norms, rope, attention
                  output, SwiGLU), or with gradient checkpointing only the layer inputs (residual stream:
                  fp32 under autocast, bf16 under ZeRO-3) plus one layer recomputed with its gradients;
                  the loss's logits: chunked (4096 rows x V x 8 B: TRL's kernel) or dense (B x C x V x 14 B:
                  bf16 logits, fp32 copy, fp32 log-softmax, fp32 gradient), twice when the loss reads the
                  teacher's full distribution
  teacher         bf16, sharded like the student under zero3 / fsdp2 (TRL prepares it with the same
                  wrapper), whole under ddp; scoring `score_rows` sequences at a time under no_grad (one
                  layer's transients, 4H + 6I bytes per token) plus its logits (chunked 4096 x V x 8 B, dense
                  rows x C x V x 10 B: the ~51 GB of 8 rows x 4.2k tokens on Qwen3's vocabulary)
  vLLM            an engine reserves `gpu_memory_utilization` of the GPU; it fits when the weights (/ tensor
                  parallel) and the KV cache of one longest sequence fit inside that share. Colocated with
                  training (TRL colocate mode) it keeps its share unless sleep mode frees it between rollouts
  overhead        2 GB per process (CUDA context, NCCL buffers, allocator slack)

GB here is 10^9 bytes; `--gpu-memory 80` means 80 x 10^9 bytes usable (an "80 GB" H100 has 85.5 x 10^9:
the slack is deliberate). The figures are pinned against a hand count in tests/test_planner.py; they are
estimates, not measurements: no GPU ran them here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from opd_bench.errors import UserError

GB = 1e9
CONFIG_DIR = Path(__file__).parent / "data" / "model_configs"
OVERHEAD = 2 * GB  # per process: CUDA context, NCCL buffers, allocator slack
VLLM_WORKSPACE = 2 * GB  # per engine: activations of the profiling run, CUDA graphs, sampler
CHUNK_ROWS = 4096  # TRL's ChunkedLogProbFunction chunk (opd_bench.logprobs.sampled_logps)
SERVER_BATCHED_TOKENS = 8192  # vLLM's max_num_batched_tokens: prompt log-probs are computed per such chunk
STRATEGIES = ("ddp", "zero3", "fsdp2")
STRATEGY_NAMES = {"ddp": "DDP", "zero3": "ZeRO-3", "fsdp2": "FSDP2"}


# --- models ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's shape, as its config.json gives it (Qwen3 / Qwen2 / Llama style)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False
    qk_norm: bool = True  # Qwen3: RMSNorm on q and k (head_dim weights each)
    attention_bias: bool = False
    max_positions: int = 0

    @classmethod
    def from_config(cls, cfg: dict, name: str = "") -> "ModelShape":
        cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(name=name or cfg.get("_name_or_path", ""), hidden=hidden,
                       intermediate=int(cfg["intermediate_size"]), layers=int(cfg["num_hidden_layers"]),
                       heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       head_dim=int(cfg.get("head_dim") or hidden // heads), vocab=int(cfg["vocab_size"]),
                       tied=bool(cfg.get("tie_word_embeddings", False)),
                       qk_norm=cfg.get("model_type", "qwen3") == "qwen3",
                       attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
                       max_positions=int(cfg.get("max_position_embeddings") or 0))
        except KeyError as exc:
            raise UserError(f"config.json of {name or 'the model'} has no {exc.args[0]!r}: the planner needs a "
                            f"decoder-only transformer's config (hidden_size, intermediate_size, ...)") from None

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        return attention + 3 * h * self.intermediate + norms

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def n_params(self) -> int:
        head = 0 if self.tied else self.embedding_params
        return self.embedding_params + head + self.layers * self.layer_params + self.hidden

    @property
    def largest_module(self) -> int:
        return max(self.layer_params, self.embedding_params)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_dim * dtype_bytes

    @property
    def saved_bytes_per_token_layer(self) -> int:
        """Tensors one decoder layer saves for backward, per token, under bf16 autocast (see module doc)."""
        return 12 * self.hidden + 10 * self.q_dim + 10 * self.kv_dim + 8 * self.intermediate

    @property
    def scoring_bytes_per_token(self) -> int:
        """Peak transients of one layer in a no-grad bf16 forward, per token."""
        return 4 * self.hidden + 6 * self.intermediate


def fixture_name(model_id: str) -> str:
    return model_id.strip("/").replace("/", "--") + ".json"


def load_shape(model: str) -> ModelShape:
    """The shape of a model: a local folder (or config.json file), else the shipped fixture of its hub id."""
    path = Path(model).expanduser()
    for candidate in (path / "config.json", path):
        if candidate.is_file():
            try:
                return ModelShape.from_config(json.loads(candidate.read_text()), name=model)
            except json.JSONDecodeError:
                raise UserError(f"{candidate} is not valid JSON: the planner reads the model's config.json") from None
    fixture = CONFIG_DIR / fixture_name(model)
    if fixture.is_file():
        return ModelShape.from_config(json.loads(fixture.read_text()), name=model)
    known = ", ".join(sorted(p.stem.replace("--", "/") for p in CONFIG_DIR.glob("*.json")))
    raise UserError(f"no config.json for model {model!r}: pass a local model folder (its config.json is enough) "
                    f"or one of the shipped configs ({known})")


# --- what a run needs ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodNeeds:
    """A method's declarations that decide memory (no method file is imported here)."""

    online_teacher: bool = True  # the teacher scores the student's fresh samples during training
    teacher_distribution: bool = False  # the loss reads the teacher's full next-token distribution
    reference: bool = False  # a reference model scores the samples too (ExOPD, lambda != 1)
    offline_rollouts: bool = False  # pi_sft's rollouts and the teacher's log-probs are precomputed
    sampler_logps: bool = False  # offline: pi_sft's own log-probs are precomputed too
    student_generation: bool = True  # the student samples during training (online rollouts)
    teacher_b: bool = False  # the inconsistent teacher (world.hf.teacher_b)
    teacher_samples: bool = False  # the teacher samples training data before training (continued SFT)

    @classmethod
    def of(cls, needs: "MethodNeeds | dict") -> "MethodNeeds":
        if isinstance(needs, cls):
            return needs
        unknown = set(needs) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"unknown method need {sorted(unknown)[0]!r}; known: "
                            f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**needs)

    @classmethod
    def from_data(cls, data) -> "MethodNeeds":
        """From a method's `Data` declaration (opd_bench.methods.base.Data)."""
        from opd_bench.methods.base import Rollouts, Teacher

        offline = data.rollouts == Rollouts.OFFLINE
        reads = data.reads
        teacher = bool(reads.teacher_logp or reads.teacher_distribution)
        return cls(online_teacher=teacher and not offline, teacher_distribution=bool(reads.teacher_distribution),
                   reference=bool(reads.reference_logp), offline_rollouts=offline,
                   sampler_logps=bool(reads.sampler_logp) and offline,
                   student_generation=not offline and teacher, teacher_b=data.teacher == Teacher.INCONSISTENT)


@dataclass(frozen=True)
class RunShape:
    """The sizes of one run: models, batch and lengths (from a preset with `run_shape`)."""

    student: ModelShape
    teacher: ModelShape | None = None
    reference: ModelShape | None = None
    micro_batch: int = 4  # sequences per forward per GPU
    batch_size: int = 256  # sequences per optimizer step, all GPUs together
    prompt_tokens: int = 256
    completion_tokens: int = 4096
    eval_tokens: int = 32768  # longest evaluation completion
    gradient_checkpointing: bool = True
    chunked_logits: bool = True
    vllm_rollouts: bool = True  # online rollouts with a colocated vLLM engine (else HF generate)
    eval_backend: Literal["vllm", "hf"] = "vllm"
    eval_batch: int = 64  # HF evaluation: sequences per generate call
    score_rows: int = 8  # sequences scored at a time by completion_logps

    @property
    def seq_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Layout:
    """Where a run executes."""

    gpus: int = 1  # training GPUs (all nodes together)
    gpu_memory_gb: float = 80.0
    strategy: Literal["ddp", "zero3", "fsdp2"] = "ddp"
    teacher: Literal["colocated", "server"] = "colocated"  # the teacher in the training processes or on a server
    server_gpus: int = 0  # the teacher server's own GPUs (charged to the budget as well)
    server_tp: int | None = None  # its tensor parallel size (default: server_gpus)
    vllm_memory: float = 0.3  # colocated rollout engine's share of each training GPU (TRL's default)
    vllm_tp: int = 1
    vllm_sleep: bool = False  # sleep mode: the colocated engine gives its memory back during the step
    eval_vllm_memory: float = 0.9  # evaluation / rollout engines in their own processes
    eval_tp: int = 1
    server_memory: float = 0.9  # the teacher server's gpu_memory_utilization

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise UserError(f"unknown layout {self.strategy!r}: choose from {', '.join(STRATEGIES)}")
        if self.teacher not in ("colocated", "server"):
            raise UserError(f"unknown teacher placement {self.teacher!r}: colocated or server")
        if self.gpus < 1 or self.gpu_memory_gb <= 0:
            raise UserError("--gpus must be >= 1 and --gpu-memory > 0")
        if self.teacher == "server" and self.server_gpus < 1:
            raise UserError("a teacher server needs its own GPUs: pass --server-gpus N (N >= 1)")

    @classmethod
    def detect(cls, **overrides) -> "Layout":
        """The layout of the current launch: WORLD_SIZE processes (torchrun / accelerate launch), the strategy
        accelerate was told (ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP), 95% of the first GPU's memory
        (80 GB without a GPU); `overrides` win (teacher placement, server GPUs, vLLM shares)."""
        import os

        strategy = "zero3" if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" else \
            "fsdp2" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" else "ddp"
        memory = 80.0
        try:
            import torch

            if torch.cuda.is_available():
                memory = 0.95 * torch.cuda.get_device_properties(0).total_memory / GB
        except ImportError:
            pass
        found = dict(gpus=int(os.environ.get("WORLD_SIZE", "1")), gpu_memory_gb=memory, strategy=strategy)
        return cls(**{**found, **overrides})

    @property
    def capacity(self) -> float:
        return self.gpu_memory_gb * GB

    @property
    def tp(self) -> int:
        return self.server_tp or self.server_gpus

    @property
    def devices(self) -> int:
        """Devices charged to the budget: training GPUs plus the server's."""
        return self.gpus + (self.server_gpus if self.teacher == "server" else 0)

    def describe(self) -> str:
        text = f"{self.gpus} x {self.gpu_memory_gb:g} GB {STRATEGY_NAMES[self.strategy]}"
        if self.teacher == "server":
            text += f", teacher server on {self.server_gpus} GPU(s) (TP {self.tp})"
        return text


@dataclass
class StageEstimate:
    """One stage's peak memory per GPU, as named parts (bytes), and what does not fit."""

    stage: str
    where: str
    parts: list[tuple[str, float]]
    capacity: float
    note: str = ""
    problems: list[str] = field(default_factory=list)  # e.g. a vLLM engine that does not fit its share

    @property
    def total(self) -> float:
        return sum(b for _, b in self.parts)

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity and not self.problems

    def why(self) -> str:
        if self.total > self.capacity:
            return f"{self.total / GB:.1f} GB per GPU, more than {self.capacity / GB:g} GB"
        return "; ".join(self.problems)

    def describe(self) -> str:
        return " + ".join(f"{name} {b / GB:.1f}" for name, b in self.parts if b >= 0.05 * GB)


# --- the estimate ----------------------------------------------------------------------------------

def _student_states(m: ModelShape, lay: Layout) -> tuple[list[tuple[str, float]], tuple[str, float] | None]:
    """Resident training states per GPU, and the gather buffers of a sharded step."""
    n, p = lay.gpus, m.n_params
    if lay.strategy == "ddp":
        parts = [("student fp32 master + grads + Adam", 16 * p), ("bf16 compute copy", 2 * p)]
        if n > 1:
            parts.append(("DDP grad buckets", 4 * p))
        return parts, None
    if lay.strategy == "zero3":
        return [("student states 18 B/param / N", 18 * p / n)], ("student gathered", 4 * m.largest_module)
    head = 0 if m.tied else m.embedding_params
    return ([("student states 16 B/param / N", 16 * p / n)],
            ("student gathered", 2 * (m.embedding_params + head) + 4 * m.layer_params))


def _frozen_weights(m: ModelShape, lay: Layout) -> tuple[float, float]:
    """bf16 weights per GPU of a model that is only scored (teacher, reference), and its gather buffers."""
    if lay.strategy == "ddp":
        return 2 * m.n_params, 0.0
    return 2 * m.n_params / lay.gpus, 2 * 2 * m.largest_module


def _activations(run: RunShape, lay: Layout) -> float:
    m, tokens = run.student, run.micro_batch * run.seq_tokens
    if not run.gradient_checkpointing:
        return tokens * (m.layers * m.saved_bytes_per_token_layer + 8 * m.hidden)
    residual = 2 if lay.strategy == "zero3" else 4  # DeepSpeed casts the model to bf16; autocast keeps fp32
    return tokens * (m.layers * residual * m.hidden + 2 * m.saved_bytes_per_token_layer)


def _loss_logits(run: RunShape, m: ModelShape, distribution: bool) -> float:
    rows = run.micro_batch * run.completion_tokens
    if run.chunked_logits:
        return min(rows, CHUNK_ROWS) * m.vocab * 8 * (2 if distribution else 1)
    return rows * m.vocab * (14 + (10 if distribution else 0))


def _forward_body(run: RunShape, m: ModelShape, rows: int) -> float:
    """No-grad forward of `rows` sequences: one layer's transients and the last hidden states."""
    return rows * run.seq_tokens * (m.scoring_bytes_per_token + 2 * m.hidden)


def _scoring(run: RunShape, m: ModelShape, rows: int) -> float:
    """completion_logps on `rows` sequences: the forward and the sampled-token logits."""
    logit_rows = rows * run.completion_tokens
    logits = min(logit_rows, CHUNK_ROWS) * m.vocab * 8 if run.chunked_logits else logit_rows * m.vocab * 10
    return _forward_body(run, m, rows) + logits


def _engine_need(m: ModelShape, max_len: int, tp: int) -> list[tuple[str, float]]:
    return [("weights bf16" + (f" / TP {tp}" if tp > 1 else ""), 2 * m.n_params / tp),
            ("KV of one longest sequence", m.kv_bytes_per_token() * max_len / tp), ("vLLM workspace", VLLM_WORKSPACE)]


def _engine(stage: str, where: str, m: ModelShape, max_len: int, share: float, tp: int, lay: Layout,
            note: str = "", extra: list[tuple[str, float]] = ()) -> StageEstimate:
    """A vLLM engine in its own process: it takes `share` of the GPU; its weights and one sequence must fit in it."""
    need = _engine_need(m, max_len, tp) + list(extra)
    used = sum(b for _, b in need)
    room = share * lay.capacity
    parts = need + [("more KV (rest of the share)", max(0.0, room - used)), ("overhead", OVERHEAD)]
    problems = [f"the engine needs {used / GB:.1f} GB, more than its {room / GB:.1f} GB share "
                f"(gpu_memory_utilization {share:g})"] if used > room else []
    if m.max_positions and max_len > m.max_positions:
        note = (note + "; " if note else "") + f"{max_len} tokens > the model's {m.max_positions} positions"
    return StageEstimate(stage, where, parts, lay.capacity, note=note, problems=problems)


def _hf_generate(stage: str, where: str, m: ModelShape, rows: int, max_len: int, lay: Layout) -> StageEstimate:
    parts = [("weights bf16", 2 * m.n_params), (f"KV cache ({rows} sequences)", rows * max_len * m.kv_bytes_per_token()),
             ("step logits", rows * m.vocab * 6), ("overhead", OVERHEAD)]
    return StageEstimate(stage, where, parts, lay.capacity, note="HF generate")


def _phase_sum(parts: list[tuple[str, float]]) -> float:
    return sum(b for _, b in parts)


def plan_memory(run: RunShape, method_needs: "MethodNeeds | dict", layout: Layout) -> list[StageEstimate]:
    """Per-GPU peak memory of every stage of the run (pure: shapes in, estimates out)."""
    needs, lay = MethodNeeds.of(method_needs), layout
    s, t = run.student, run.teacher
    stages: list[StageEstimate] = []
    engines = f"{lay.gpus} x vLLM engine (TP {lay.eval_tp})"

    def generation(stage: str, max_len: int) -> StageEstimate:
        if run.eval_backend == "vllm":
            return _engine(stage, engines, s, max_len, lay.eval_vllm_memory, lay.eval_tp, lay, note="own process")
        return _hf_generate(stage, f"{lay.gpus} x GPU", s, run.eval_batch, max_len, lay)

    stages.append(generation("eval (pi_sft, curve, final)", run.prompt_tokens + run.eval_tokens))
    server = lay.teacher == "server" and t is not None and (needs.online_teacher or needs.offline_rollouts)
    if needs.teacher_samples and t is not None:
        stages.append(_engine("teacher samples", engines, t, run.seq_tokens, lay.eval_vllm_memory, lay.eval_tp, lay,
                              note="own process") if run.eval_backend == "vllm" else
                      _hf_generate("teacher samples", f"{lay.gpus} x GPU", t, run.eval_batch, run.seq_tokens, lay))
    if needs.offline_rollouts:
        stages.append(generation("rollouts (pi_sft samples)", run.seq_tokens))
        if t is not None and not server:
            stages.append(StageEstimate(
                "teacher precompute", f"{lay.gpus} x GPU (rows sharded)",
                [("teacher bf16", 2 * t.n_params), (f"scoring {run.score_rows} rows", _scoring(run, t, run.score_rows)),
                 ("overhead", OVERHEAD)], lay.capacity, note="chunked logits" if run.chunked_logits else "dense logits"))
        if needs.sampler_logps:
            stages.append(StageEstimate(
                "sampler precompute", f"{lay.gpus} x GPU (rows sharded)",
                [("pi_sft bf16", 2 * s.n_params), (f"scoring {run.score_rows} rows", _scoring(run, s, run.score_rows)),
                 ("overhead", OVERHEAD)], lay.capacity))

    # Training: what stays resident, then the largest of its phases (generate, score, step).
    resident, gathered = _student_states(s, lay)
    teacher_in_training = needs.online_teacher and t is not None and not server
    distribution_in_loss = needs.teacher_distribution and teacher_in_training  # a server sends top-k instead
    score: list[tuple[str, float]] = []
    step_extra: list[tuple[str, float]] = []
    if teacher_in_training:
        weights, buffers = _frozen_weights(t, lay)
        resident.append(("teacher bf16" + (" / N" if lay.strategy != "ddp" else ""), weights))
        if needs.teacher_distribution:  # the teacher runs inside the loss, on the micro-batch
            step_extra += [("teacher gathered", buffers), ("teacher forward", _forward_body(run, t, run.micro_batch))]
        else:
            score += [("teacher gathered", buffers), (f"teacher scoring {run.score_rows} rows",
                                                      _scoring(run, t, run.score_rows))]
    if needs.reference:
        ref = run.reference or s
        weights, buffers = _frozen_weights(ref, lay)
        resident.append(("reference bf16" + (" / N" if lay.strategy != "ddp" else ""), weights))
        ref_score = [("reference gathered", buffers), ("reference scoring", _scoring(run, ref, run.score_rows))]
        score = max(score, ref_score, key=_phase_sum)
    problems: list[str] = []
    generate: list[tuple[str, float]] = []
    if needs.student_generation:
        if run.vllm_rollouts:
            room = lay.vllm_memory * lay.capacity
            need = _phase_sum(_engine_need(s, run.seq_tokens, lay.vllm_tp))
            if need > room:
                problems.append(f"the colocated vLLM engine needs {need / GB:.1f} GB, more than its {room / GB:.1f} GB "
                                f"share (vllm_gpu_memory_utilization {lay.vllm_memory:g})")
            (generate if lay.vllm_sleep else resident).append(("vLLM colocated share", room))
        else:
            rows = max(1, math.ceil(run.batch_size / lay.gpus))
            generate.append((f"HF generate KV ({rows} sequences)",
                             rows * (run.seq_tokens * s.kv_bytes_per_token() + s.vocab * 6)))
            if gathered is not None:
                generate.append(gathered)
    step = ([gathered] if gathered else []) + [
        ("activations" + (" (checkpointed)" if run.gradient_checkpointing else ""), _activations(run, lay)),
        ("loss logits" + (" chunked" if run.chunked_logits else " dense"), _loss_logits(run, s, distribution_in_loss)),
        *step_extra]
    phases = {"step": step, "score": score, "generate": generate}
    peak = max(phases, key=lambda k: _phase_sum(phases[k]))
    where = f"{lay.gpus} x training GPU ({STRATEGY_NAMES[lay.strategy]})"
    stages.append(StageEstimate("train", where, resident + phases[peak] + [("overhead", OVERHEAD)], lay.capacity,
                                note=f"peak in the {peak} phase; micro-batch {run.micro_batch} x {run.seq_tokens} "
                                     f"tokens", problems=problems))
    if server:
        tp = lay.tp
        logits = min(SERVER_BATCHED_TOKENS, run.score_rows * run.seq_tokens) * t.vocab * 8
        stages.append(_engine("teacher server", f"{lay.server_gpus} x server GPU (vLLM TP {tp})", t, run.seq_tokens,
                              lay.server_memory, tp, lay, note="prompt log-probs; top-k approximates the "
                              "distribution", extra=[("prompt log-prob logits", logits)]))
    return stages


# --- fitting and fixes -----------------------------------------------------------------------------

def _fits(run: RunShape, needs: MethodNeeds, lay: Layout) -> bool:
    return all(s.fits for s in plan_memory(run, needs, lay))


def _flags(run: RunShape, lay: Layout, base: RunShape) -> str:
    flags = [f"--gpus {lay.gpus}", f"--layout {lay.strategy}"]
    if lay.teacher == "server":
        flags.append(f"--teacher server --server-gpus {lay.server_gpus}")
    if lay.eval_tp > 1:
        flags.append(f"--eval-tp {lay.eval_tp}")
    if run.micro_batch != base.micro_batch:
        flags.append(f"--set train.micro_batch_size={run.micro_batch}")
    return " ".join(flags)


def _candidates(run: RunShape, needs: MethodNeeds, layout: Layout):
    """(devices, rank, text, run, layout) for changes that fit: a smaller micro-batch, then layouts."""
    micro = run.micro_batch // 2
    while micro >= 1:
        r = replace(run, micro_batch=micro)
        if _fits(r, needs, layout):
            yield layout.devices, 0, f"micro-batch {micro}, same global batch", r, layout
            break
        micro //= 2
    has_teacher = run.teacher is not None and (needs.online_teacher or needs.offline_rollouts)
    for n in (k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k >= layout.gpus):
        for strategy in dict.fromkeys((layout.strategy, "zero3")):
            if strategy == "ddp" and n > layout.gpus:
                continue  # more replicas never lower the per-GPU memory
            servers = [layout.server_gpus if layout.teacher == "server" else 0]
            servers += [k for k in (1, 2, 4, 8) if has_teacher and k not in servers]
            for eval_tp in (k for k in dict.fromkeys((layout.eval_tp, 2, 4, 8)) if k <= n):
                for k in servers:
                    lay = replace(layout, gpus=n, strategy=strategy, eval_tp=eval_tp,
                                  teacher="server" if k else "colocated", server_gpus=k,
                                  server_tp=layout.server_tp if k == layout.server_gpus else None)
                    if lay == layout or not _fits(run, needs, lay):
                        continue
                    same = (n, strategy) == (layout.gpus, layout.strategy)
                    text = f"the same {n} GPU(s)" if same else f"{n} GPU(s) with {STRATEGY_NAMES[strategy]}"
                    if k:
                        text += f" and a teacher server on {k} GPU(s)"
                    if eval_tp != layout.eval_tp:
                        text += f", evaluation engines at tensor parallel {eval_tp}"
                    yield lay.devices, 1 + (k > 0) + (eval_tp != layout.eval_tp), text, run, lay
                    break


def suggest_fix(run: RunShape, method_needs: "MethodNeeds | dict", layout: Layout) -> str | None:
    """The cheapest changes that make every stage fit (fewest devices; a smaller micro-batch first), as text."""
    needs = MethodNeeds.of(method_needs)
    bad = next((s.stage for s in plan_memory(run, needs, layout) if not s.fits), "train")
    found = sorted(_candidates(run, needs, layout), key=lambda c: (c[0], c[1]))
    picked, kinds = [], set()
    for devices, _, text, r, lay in found:
        kind = (lay.teacher, r.micro_batch != run.micro_batch)
        if kind in kinds:
            continue
        kinds.add(kind)
        after = next((s.total for s in plan_memory(r, needs, lay) if s.stage == bad), 0.0) / GB
        picked.append(f"{text} (`{_flags(r, lay, run)}`: {bad} {after:.1f} GB per GPU, {devices} devices)")
        if len(picked) == 2:
            break
    return " or ".join(picked) or None


def check_fits(run: RunShape, method_needs: "MethodNeeds | dict", layout: Layout) -> None:
    """Raise a one-line UserError (exit 2) naming the first stage that cannot fit, and the fix."""
    bad = next((s for s in plan_memory(run, method_needs, layout) if not s.fits), None)
    if bad is None:
        return
    fix = suggest_fix(run, method_needs, layout)
    raise UserError(f"stage {bad.stage!r} does not fit on {layout.describe()}: {bad.why()}; "
                    + (f"fix: {fix}" if fix else "no layout up to 128 GPUs fits: a smaller model or shorter sequences"))


# --- from a preset --------------------------------------------------------------------------------

def run_shape(cfg, needs: "MethodNeeds | dict | None" = None, *, prompt_tokens: int = 256,
              reference: str | None = None) -> RunShape | None:
    """The RunShape of a RunConfig (None for the micro world: tiny models, nothing to plan). `reference`: the
    reference model's id or folder when it is not pi_sft."""
    from opd_bench.methods.base import PI_SFT

    needs = MethodNeeds.of(needs or {})
    if cfg.world.kind != "hf":
        return None
    hf, train = cfg.world.hf, cfg.train
    student = load_shape(hf.sft_student) if hf.sft_student and _resolvable(hf.sft_student) else load_shape(hf.student)
    teacher_id = hf.teacher_b if needs.teacher_b and hf.teacher_b else hf.teacher
    teacher = load_shape(teacher_id) if teacher_id else None
    eval_tokens = _eval_tokens(cfg)
    ref = load_shape(reference) if reference and reference != PI_SFT else None
    return RunShape(student=student, teacher=teacher, reference=ref, micro_batch=train.micro_batch_size or train.batch_size,
                    batch_size=train.batch_size,
                    prompt_tokens=prompt_tokens, completion_tokens=train.max_new_tokens, eval_tokens=eval_tokens,
                    gradient_checkpointing=train.gradient_checkpointing, chunked_logits=train.logits != "dense",
                    vllm_rollouts=bool(getattr(train, "vllm", False)), eval_backend=cfg.eval.backend,
                    eval_batch=cfg.eval.batch_size)


def _resolvable(model: str) -> bool:
    path = Path(model).expanduser()
    return (path / "config.json").is_file() or path.is_file() or (CONFIG_DIR / fixture_name(model)).is_file()


def _eval_tokens(cfg) -> int:
    try:
        from opd_bench.registry import TASKS

        return max(TASKS.get(name).max_new_tokens for name in cfg.eval.tasks)
    except Exception:  # a task that does not resolve fails later, where the run evaluates it
        return 32768


def needs_for(cfg, method: str | None = None):
    """(MethodNeeds, the reference model's id or None) of a method, from its declarations (resolve(...).data).
    A method with a trainer of its own that reads no teacher signal (sft-continue) samples from the teacher."""
    from opd_bench.methods.base import Method
    from opd_bench.resolve import resolve

    resolved = resolve(cfg, method)
    needs = MethodNeeds.from_data(resolved.data)
    if type(resolved.method).trainer is not Method.trainer and not (needs.online_teacher or needs.offline_rollouts):
        needs = replace(needs, teacher_samples=True)
    return needs, resolved.data.reference if needs.reference else None


def check_config(cfg, needs: "MethodNeeds | dict", layout: Layout, *, prompt_tokens: int = 256,
                 reference: str | None = None) -> list[StageEstimate]:
    """`run`'s check before any work: the stages' estimates, or a UserError (exit 2) with the fix.
    Nothing to check for the micro world (returns [])."""
    run = run_shape(cfg, needs, prompt_tokens=prompt_tokens, reference=reference)
    if run is None:
        return []
    check_fits(run, needs, layout)
    return plan_memory(run, needs, layout)


def render(stages: list[StageEstimate], title: str):
    """A rich Table of the stages."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("stage", "where", "per GPU GB", "fits", "what (GB)"):
        table.add_column(col, overflow="fold")
    for s in stages:
        ok = "[green]yes[/green]" if s.fits else "[red]no[/red]"
        what = s.describe() + (f"; {s.note}" if s.note else "")
        table.add_row(s.stage, s.where, f"{s.total / GB:.1f} / {s.capacity / GB:g}", ok, what)
    return table


def plan_report(cfg, method: str, layout: Layout, *, prompt_tokens: int = 256):
    """(rich Table, None or the one-line problem with its fix) for `opd-bench plan`."""
    from rich.table import Table

    needs, reference = needs_for(cfg, method)
    run = run_shape(cfg, needs, prompt_tokens=prompt_tokens, reference=reference)
    if run is None:
        table = Table(title=f"plan --preset {cfg.preset}: the {cfg.world.kind} world's models are tiny (CPU); "
                            f"nothing to plan")
        return table, None
    stages = plan_memory(run, needs, layout)
    models = f"student {run.student.name} ({run.student.n_params / 1e9:.2f}B)"
    if run.teacher is not None and (needs.online_teacher or needs.offline_rollouts or needs.teacher_samples):
        models += f", teacher {run.teacher.name} ({run.teacher.n_params / 1e9:.2f}B)"
    table = render(stages, f"plan {method} --preset {cfg.preset} on {layout.describe()}: {models}; "
                           f"devices charged: {layout.devices}")
    try:
        check_fits(run, needs, layout)
    except UserError as exc:
        return table, str(exc)
    return table, None
