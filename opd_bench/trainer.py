"""OPDTrainer: one subclass of TRL's DistillationTrainer that runs every OPD method, on CPU and GPU. It is
method-blind: it computes what the method's `Data` declaration asks for and trains on the method's `loss`.

Per generation batch (`_generate_and_score_completions`):
  online   TRL generates (HF generate or vLLM); if the method reads sampled-token teacher log-probs (and not
           the teacher's full distribution), the teacher scores the sampled tokens under no_grad, and the
           reference does when the method reads reference log-probs;
  offline  the batch is read from the precomputed dataset (prompt ids, completion ids and the declared
           log-probs): no generation and no teacher in memory.
Per micro-batch (`compute_loss`): `method.loss(Signals, params)`, where `Signals` computes each per-token
signal on first read (nothing the method does not read is computed) and `num_items` is the global count of
completion tokens, so gradient accumulation and data parallelism give the big-batch gradient exactly.

Every FLOP is charged to `self.cost` (generation 2N, scoring 2N, training 6N per token) for the budget.

Sharded runs (FSDP2, ZeRO-3) score correctly because every model call goes through its wrapper, as TRL does: the
student's loss runs inside the student wrapper's forward (`_forward_redirection`), and every teacher / reference
read (backbone, head, per-position signals) inside the frozen model's wrapper forward (`_frozen`), so FSDP2
gathers the root's parameters (embeddings, head) and ZeRO-3 its hooks' ones; a head weight used directly by TRL's
kernels is gathered as TRL does (`full_tensor()` for FSDP2, the kernels' own ZeRO-3 gather).

Teacher server (`teacher_server`, teacher_server.py): the sampled tokens' teacher log-probs come from a vLLM server;
a method reading the teacher's full distribution gets its top-k and every signal of it is computed on the
coarse-grained distributions (the k tokens + one bucket for the rest of the vocabulary, whose KL is a lower bound of
the full one): an approximation, recorded in `self.approximation` and the row.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import torch
from trl import DistillationConfig, DistillationTrainer
from trl.trainer.utils import RepeatSampler, pad

from opd_bench.config import RunConfig
from opd_bench.errors import UserError
from opd_bench.ledger import StageCost
from opd_bench.logprobs import check_plain_head, completion_logps, n_params
from opd_bench.memory import AllocatorPeak
from opd_bench.methods.base import Data, Loss, Rollouts
from opd_bench.token_signals import Signals



def gradient_variance(group_losses, params) -> tuple[float, float]:
    """Variance of a batch's stochastic gradient, estimated from G disjoint groups of the batch.

    Each callable in `group_losses` returns a group's contribution L_h to the batch loss (normalized by the
    batch's global token count, so g = sum_h g_h is the batch gradient). G*g_h are G independent estimates of
    g at 1/G of the batch; their sample variance divided by G estimates the batch gradient's variance:
        tr Cov(g) ~ (G * sum_h |g_h|^2 - |g|^2) / (G - 1)      (unbiased for i.i.d. groups; may be < 0)
    Returns (that estimate, |g|^2). Memory: one gradient-sized buffer, whatever G.
    """
    total, sum_sq, n = None, 0.0, 0
    for loss in group_losses:
        grads = torch.autograd.grad(loss(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]
        sum_sq += sum(float(g.double().pow(2).sum()) for g in grads)
        grads = [g if g.dtype == torch.float64 else g.float() for g in grads]
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
        n += 1
    if n < 2:
        raise ValueError("gradient_variance needs at least 2 groups")
    norm2 = sum(float(t.double().pow(2).sum()) for t in total)
    return (n * sum_sq - norm2) / (n - 1), norm2


class OPDTrainer(DistillationTrainer):
    def __init__(self, *, method, params, data: Data, ref_model=None, chunked: bool = False,
                 rollouts_per_prompt: int = 1, teacher_server=None, teacher_params: int = 0, server_topk: int = 20,
                 **kwargs):
        self.method, self.params, self.data, self.chunked = method, params, data, chunked
        self.offline = data.rollouts == Rollouts.OFFLINE
        self.rollouts_per_prompt = 1 if self.offline else rollouts_per_prompt
        self.teacher_server, self.server_topk = teacher_server, server_topk
        self.approximation: str | None = None  # set when a served teacher's top-k stands for its distribution
        self.rows_trained = 0  # sequences this process trained on (tests: the global batch is the preset's)
        self._loss_peak: AllocatorPeak | bool = False  # False: not measured yet in this attempt (see training_step)
        n_ref = n_params(ref_model) if ref_model is not None else 0  # before any sharding
        super().__init__(**kwargs)
        check_plain_head(self.model)
        self.cost = StageCost(stage="train")
        self.n_student = n_params(self.model)
        self.n_teacher = n_params(self.teacher_model) if self.teacher_model is not None else teacher_params
        self.ref_model = None
        if ref_model is not None:
            self.n_ref = n_ref
            self.ref_model = self.accelerator.prepare_model(ref_model.eval(), evaluation_mode=True)

    # --- data ------------------------------------------------------------------------------------

    def _get_train_sampler(self, dataset=None):
        # TRL samples one completion per prompt; K rollouts per prompt repeat each prompt K times in a batch.
        k = self.rollouts_per_prompt
        generation_batch = self.args.per_device_train_batch_size * self.accelerator.num_processes \
            * self.args.gradient_accumulation_steps
        return RepeatSampler(data_source=dataset if dataset is not None else self.train_dataset,
                             mini_repeat_count=k, batch_size=generation_batch // k,
                             repeat_count=self.args.gradient_accumulation_steps,
                             shuffle=self.shuffle_dataset, seed=self.args.seed)

    def _generate_and_score_completions(self, inputs):
        if self.offline:
            return self.score_batch(self._offline_batch(inputs))
        batch = super()._generate_and_score_completions(inputs)
        self.cost.generate(self.n_student, int(batch["completion_mask"].sum()))
        return self.score_batch(batch)

    def score_batch(self, batch: dict) -> dict:
        """Add the sampled-token log-probs the method declared and the batch does not carry yet (no_grad)."""
        reads = self.data.reads
        if self.teacher_server is not None and (reads.teacher_logp or reads.teacher_distribution):
            self._score_on_server(batch)
        if reads.teacher_logp and not reads.teacher_distribution and "teacher_logps" not in batch:
            batch["teacher_logps"] = self._score(self.teacher_model, self.n_teacher, batch)  # else: the loss's
        if self.ref_model is not None and "ref_logps" not in batch:  # teacher forward gives it
            batch["ref_logps"] = self._score(self.ref_model, self.n_ref, batch)
        return batch

    def _score_on_server(self, batch: dict) -> None:
        """The served teacher's log-probs of the sampled tokens, and its top-k when the method reads the teacher's
        distribution (one request for both; charged as scoring with the teacher's parameter count)."""
        if "teacher_logps" in batch:
            return
        args = (batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
        self.cost.score(self.n_teacher, int(batch["prompt_mask"].sum() + batch["completion_mask"].sum()))
        dtype = torch.float64 if self.model.dtype == torch.float64 else torch.float32
        if self.data.reads.teacher_distribution:
            logps, top = self.teacher_server.completion_scores(*args, k=self.server_topk, temperature=self.temperature)
            batch["teacher_topk_logps"], batch["teacher_topk_ids"] = top.logps.to(dtype), top.ids
            self.approximation = top.note
        else:
            logps = self.teacher_server.completion_logps(*args, temperature=self.temperature)
        batch["teacher_logps"] = logps.to(dtype)

    def _frozen(self, wrapped, fn, *args):
        """fn(model, *args) inside a frozen model's wrapper forward, without gradient: the teacher's or the
        reference's sharded parameters are gathered as their wrapper does it (TRL routes its teacher so too)."""
        model = self.accelerator.unwrap_model(wrapped)
        model.eval()
        with torch.no_grad():
            return self._forward_redirection(wrapped, model, fn, model, *args)

    def _score(self, model, n: int, batch: dict) -> torch.Tensor:
        self.cost.score(n, int(batch["prompt_mask"].sum() + batch["completion_mask"].sum()))
        return self._frozen(model, lambda m, *a: completion_logps(m, *a, temperature=self.temperature,
                                                                    chunked=self.chunked),
                            batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])

    def _offline_batch(self, rows: list[dict]) -> dict:
        """A generation batch from precomputed rows, padded exactly as TRL pads generated ones."""
        device = self.accelerator.device
        pad_id = self._tokenizer.pad_token_id

        def padded(key, side, value, dtype=torch.long):
            return pad([torch.tensor(r[key], dtype=dtype) for r in rows], padding_value=value,
                       padding_side=side).to(device)

        def ones(key, side):
            return pad([torch.ones(len(r[key]), dtype=torch.long) for r in rows], padding_value=0,
                       padding_side=side).to(device)

        batch = {"prompt_ids": padded("prompt_ids", "left", pad_id), "prompt_mask": ones("prompt_ids", "left"),
                 "completion_ids": padded("completion_ids", "right", pad_id),
                 "completion_mask": ones("completion_ids", "right")}
        dtype = self.model.dtype if self.model.dtype == torch.float64 else torch.float32
        for key in ("teacher_logps", "ref_logps", "sampler_logps"):
            if key in rows[0]:
                batch[key] = padded(key, "right", 0.0, dtype)
        batch["num_items_in_batch"] = self.accelerator.gather(batch["completion_mask"].sum()).sum()
        return batch

    # --- loss ------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._grad_variance_due():
            self._log_grad_variance(model, inputs)
        if self._loss_peak is True and not getattr(self, "_measuring", False):  # armed by training_step: from
            with self._off_the_clock():  # here (the step's own loss, not a gradient-variance group's) to the end
                # of its backward; the profiler's start-up (a second, the first time) is not the method's
                self._loss_peak = self._loss_window.enter_context(AllocatorPeak(self.accelerator.device))
        # The global token count from generation, clamped: an all-empty batch must give 0, not 0/0 = NaN
        # (the TRL IWOPD bug in reference/trl.md). Divided by the process count because DDP averages gradients.
        count = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        student = self.accelerator.unwrap_model(model)
        loss = self._forward_redirection(model, student, self._method_loss, student, inputs, count)
        return (loss, None) if return_outputs else loss

    def _method_loss(self, student, inputs, count):
        if self.model.training and not getattr(self, "_measuring", False):
            self.rows_trained += int(inputs["completion_ids"].shape[0])
        s = Signals(self, student, inputs, count)
        out = self.method.loss(s, self.params)
        self._log_signals(s, out)
        return out.value

    @torch.no_grad()
    def _log_signals(self, s: Signals, out: Loss) -> None:
        m, n = self._metrics["train"], s.mask.sum().clamp(min=1)
        if "teacher_logp" in s.__dict__ or "teacher_logps" in s.inputs:  # logged only when the method read it
            reward = (s.teacher_logp - s.student_logp.detach()).masked_fill(~s.mask, 0)
            m["opd/reward"].append((reward.sum() / n).item())  # minus the sampled per-token reverse KL
        m["opd/tokens_kept"].append(((out.kept & s.mask).sum() / n).item())
        if out.advantage is not None:
            a = out.advantage[out.kept & s.mask].double()
            if a.numel() > 1:
                m["opd/advantage_mean"].append(a.mean().item())
                m["opd/advantage_var"].append(a.var().item())  # vOPD's variance claim is measured, not assumed
        if "entropy" in s.__dict__:  # logged only when the method computed it
            m["opd/entropy"].append((s.entropy.masked_fill(~s.mask, 0).sum() / n).item())

    # --- the loss's peak memory (TIP's claim): measured on the attempt's first micro-batch -------------------

    def training_step(self, model, inputs, num_items_in_batch):
        """Once per attempt (the CPU profiler is slow): `opd/loss_peak_mb`, the allocator's peak (memory.py) from
        the loss computation's start (after generation, scoring and any gradient-variance measurement) to the
        end of its backward: Signals, the method's loss and the backward of this very step, computed once, so
        the step trains as any other. Starting the profiler and reading its events is off the budget's clock."""
        if self._loss_peak is not False:
            return super().training_step(model, inputs, num_items_in_batch)
        self._loss_peak, self._loss_window = True, ExitStack()
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            with self._off_the_clock():
                self._loss_window.close()
        peak = self._loss_peak
        if isinstance(peak, AllocatorPeak):
            with self._off_the_clock():
                self._metrics["train"]["opd/loss_peak_mb"].append(peak.bytes / 2**20)
        return loss

    def _off_the_clock(self) -> ExitStack:
        """The budget's wall clock paused (diagnostics are not the method's spend)."""
        from opd_bench.budget import BudgetCallback

        clocks = ExitStack()
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, BudgetCallback):
                clocks.enter_context(callback.pause())
        return clocks

    # --- gradient variance: a diagnostic (vOPD's claim), measured on logging steps only -----------------

    GRAD_VAR_GROUPS = 4  # row groups per measured micro-batch (3 degrees of freedom per measurement)
    GRAD_VAR_MAX_PARAMS = 200_000_000  # larger students (GPU presets): the output head's gradient only, so the
    # one extra gradient-sized buffer stays small (a full fp32 copy of an 8B model's gradient would be 32 GB)

    def _grad_variance_due(self) -> bool:
        """The first micro-batch of each step that will be logged; single process (sharded or DDP-wrapped
        parameters would need collectives), and never while measuring (the measurement calls compute_loss)."""
        every = max(1, int(self.args.logging_steps))
        return (self.model.training and not getattr(self, "_measuring", False)
                and self.accelerator.num_processes == 1 and not self.is_deepspeed_enabled and not self.is_fsdp_enabled
                and (self.state.global_step + 1) % every == 0
                and self._step % self.args.gradient_accumulation_steps == 0)

    def _log_grad_variance(self, model, inputs: dict) -> None:
        """Log `opd/grad_var` (gradient_variance over row groups of this micro-batch, through the method's own
        loss; TIP selects tokens within each group) and `opd/grad_norm2`. The training step itself is unchanged;
        the measurement's FLOPs and signals are not recorded, and its time is given back to the budget's clock."""
        rows = inputs["completion_ids"].shape[0]
        if rows < 2:
            return
        metrics, cost = self._metrics["train"], self.cost

        def group_loss(index):
            sub = {k: v[index] if torch.is_tensor(v) and v.dim() and v.shape[0] == rows else v for k, v in inputs.items()}
            return lambda: self.compute_loss(model, sub)

        with self._off_the_clock():  # like the curve evaluations, a diagnostic must not cost the method steps
            self._metrics["train"], self.cost, self._measuring = defaultdict(list), StageCost(stage="grad-var"), True
            try:
                params = [p for p in model.parameters() if p.requires_grad]
                if sum(p.numel() for p in params) > self.GRAD_VAR_MAX_PARAMS:
                    head = self.accelerator.unwrap_model(model).get_output_embeddings()
                    params = [p for p in head.parameters() if p.requires_grad]
                groups = torch.arange(rows, device=inputs["completion_ids"].device).chunk(min(self.GRAD_VAR_GROUPS, rows))
                var, norm2 = gradient_variance([group_loss(g) for g in groups], params)
            finally:
                self._metrics["train"], self.cost, self._measuring = metrics, cost, False
        metrics["opd/grad_var"].append(var)
        metrics["opd/grad_norm2"].append(norm2)


def world_size() -> int:
    """Processes of this launch (torchrun / accelerate launch): accelerate's state once it exists, else WORLD_SIZE."""
    from accelerate import PartialState

    state = PartialState._shared_state
    if state.get("num_processes"):
        return int(state["num_processes"])
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def report_to(value) -> list[str]:
    """train.report_to -> TRL's report_to: auto = tensorboard when it is installed; a tracker asked for by name
    must be installed (one line, before any work)."""
    import importlib.util

    names = [value] if isinstance(value, str) else list(value)
    if names in (["auto"], []):
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX") \
            else []
    if names == ["none"]:
        return []
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",),
                "mlflow": ("mlflow",), "comet_ml": ("comet_ml",), "clearml": ("clearml",)}
    for name in names:
        if name not in packages:
            raise UserError(f"train.report_to: unknown tracker {name!r} (choose from: auto, none, "
                            f"{', '.join(packages)})")
        if not any(importlib.util.find_spec(p) for p in packages[name]):
            raise UserError(f"train.report_to asks for {name}, which is not installed: pip install {packages[name][0]}"
                            f" (or --set train.report_to=none)")
    return names


def global_batch(t, rollouts_per_prompt: int = 1) -> tuple[int, int]:
    """(micro-batch, accumulation steps) that give the preset's global batch `t.batch_size` whatever the number of
    processes: accumulation = batch / (micro-batch x processes); a one-line error when it does not divide."""
    world = world_size()
    micro = t.micro_batch_size or max(1, t.batch_size // world)
    if t.batch_size % (micro * world) or t.batch_size % rollouts_per_prompt:
        raise UserError(f"train.batch_size={t.batch_size} must be a multiple of train.micro_batch_size={micro} x "
                        f"{world} process(es) (the global batch is the preset's; accumulation = batch / (micro x "
                        f"processes)) and of train.rollouts_per_prompt={rollouts_per_prompt}")
    return micro, t.batch_size // (micro * world)


def opd_args(cfg: RunConfig, data: Data, out_dir: Path, n_rows: int | None = None,
             run_name: str | None = None) -> DistillationConfig:
    """TRL arguments from the preset's shared `train` section (the same for every method). The global batch is the
    preset's whatever the number of processes: accumulation = batch / (micro-batch x processes)."""
    t = cfg.train
    offline = data.rollouts == Rollouts.OFFLINE
    micro, accumulation = global_batch(t, 1 if offline else t.rollouts_per_prompt)
    gpu = torch.cuda.is_available()
    steps = t.max_steps or 10**9  # the budget stops training
    if offline and n_rows is not None:  # and at most max_passes over the rollouts
        steps = min(steps, max(1, math.floor(t.max_passes * n_rows / t.batch_size)))
    return DistillationConfig(
        output_dir=str(out_dir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=t.max_grad_norm, max_steps=steps, max_completion_length=t.max_new_tokens,
        temperature=t.temperature, top_p=1.0, top_k=0, seed=cfg.seed, data_seed=cfg.seed,
        # fp32 master weights (models.py) with bf16 autocast compute on GPU
        use_cpu=not gpu, bf16=gpu, gradient_checkpointing=gpu and t.gradient_checkpointing,  # see trl.md
        logging_steps=t.logging_steps, save_strategy="no", report_to=report_to(t.report_to), run_name=run_name,
        disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, shuffle_dataset=True,
        ddp_find_unused_parameters=False,  # the loss reads every parameter (backbone and head)
        use_vllm=t.vllm and not offline, vllm_mode=cfg.vllm.mode, vllm_tensor_parallel_size=cfg.vllm.tensor_parallel,
        vllm_gpu_memory_utilization=cfg.vllm.gpu_memory_utilization, vllm_enable_sleep_mode=cfg.vllm.sleep,
        vllm_max_model_length=cfg.vllm.max_model_len, vllm_server_host=cfg.vllm.server_host,
        vllm_server_port=cfg.vllm.server_port, vllm_server_timeout=cfg.vllm.server_timeout,
    )
