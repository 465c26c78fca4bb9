"""Supervised fine-tuning with TRL's SFTTrainer (teachers from scratch, the SFT student, sft-continue).

The data is tokenized here, in one batched call, instead of by SFTTrainer's per-example map: with a
character tokenizer and 10^5 examples that map took minutes (1,300 examples/s measured), a large
share of the micro preset's time. The result is the same chat-formatted `input_ids` with `labels`
= -100 on the prompt, which SFTTrainer accepts as a pre-processed dataset.
"""

from __future__ import annotations

from pathlib import Path

from opd_bench.config import Training
from opd_bench.generation import chat_prompt


def tokenize_pairs(tokenizer, prompts: list[str], completions: list[str],
                   unlearned: list[list[tuple[int, int]]] | None = None):
    """A `datasets.Dataset` of chat-formatted (prompt, completion) pairs, loss on the completion only.

    `unlearned`: per completion, character spans kept out of the loss as well (the micro world's
    corrected mistakes); needs a tokenizer with one token per character.
    """
    from datasets import Dataset

    prompt_texts = [chat_prompt(tokenizer, p) for p in prompts]
    # The full conversation must be the prompt followed by completion + EOS; check it on one example
    # rather than assume it, since that is what lets us tokenize the two parts separately.
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]},
                                          {"role": "assistant", "content": completions[0]}], tokenize=False)
    if full != prompt_texts[0] + completions[0] + tokenizer.eos_token:
        raise ValueError("the tokenizer's chat template does not end an assistant turn with EOS")
    p_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer([c + tokenizer.eos_token for c in completions], add_special_tokens=False)["input_ids"]
    labels = [list(c) for c in c_ids]
    for text, ids, spans in zip(completions, labels, unlearned or []):
        if spans and len(ids) != len(text) + 1:
            raise ValueError("unlearned spans need a tokenizer with one token per character")
        for start, end in spans:
            ids[start:end] = [-100] * (end - start)
    return Dataset.from_dict({
        "input_ids": [p + c for p, c in zip(p_ids, c_ids)],
        "labels": [[-100] * len(p) + c for p, c in zip(p_ids, labels)],
    })


def sft_config(out_dir: Path, *, steps: int, batch_size: int, lr: float, seed: int, max_length: int,
               accumulation: int = 1, scheduler: str = "cosine", warmup_steps: int = 0, adam_beta2: float = 0.999,
               max_grad_norm: float = 1.0, logging_steps: int = 50, tokens_seen: str = "all", quiet: bool = True,
               **extra):
    """SFTConfig for every SFT stage here (the world's teachers and student, continued SFT); CPU-safe (trl.md).
    `extra`: further SFTConfig fields (early stopping's evaluation and saving)."""
    import torch
    from trl import SFTConfig

    gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=lr, lr_scheduler_type=scheduler,
        warmup_steps=warmup_steps, weight_decay=0.0, adam_beta2=adam_beta2, max_grad_norm=max_grad_norm,
        max_length=max_length, use_cpu=not gpu, bf16=gpu, gradient_checkpointing=False,
        report_to=[], logging_steps=logging_steps, seed=seed, data_seed=seed,
        dataloader_num_workers=0, include_num_input_tokens_seen=tokens_seen, dataset_num_proc=None,
        disable_tqdm=quiet, **{"save_strategy": "no", **extra})


def train_sft(model, tokenizer, dataset, training: Training, out_dir: Path, *, seed: int,
              max_steps: int | None = None, max_length: int = 256, callbacks: list | None = None,
              lr_scheduler: str = "cosine", eval_dataset=None) -> dict:
    """Train `model` in place; returns the tokens processed and the last logged loss.

    `callbacks` are TRL/transformers TrainerCallbacks (e.g. a budget that stops training). With
    `training.eval_every` and an `eval_dataset` (held-out teacher samples), transformers' early stopping:
    the held-out loss every `eval_every` steps, a stop after `patience` evaluations without a new best, and
    the best checkpoint loaded at the end (the student is converged on its own data, not on its step count).
    """
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    # cosine: annealed to 0, the model ends converged for its budget
    early = bool(training.eval_every and eval_dataset is not None)
    stopping = dict(eval_strategy="steps", save_strategy="steps", eval_steps=training.eval_every,
                    save_steps=training.eval_every, load_best_model_at_end=True, metric_for_best_model="eval_loss",
                    greater_is_better=False, save_total_limit=2, save_only_model=True,  # the best and the newest
                    per_device_eval_batch_size=4 * training.batch_size) if early else {}
    args = sft_config(out_dir / "trainer", steps=max_steps or training.steps, batch_size=training.batch_size,
                      lr=training.lr, seed=seed, max_length=max_length, scheduler=lr_scheduler,
                      warmup_steps=training.warmup_steps, adam_beta2=0.98, quiet=False, **stopping)
    if early:
        callbacks = [*(callbacks or []), EarlyStoppingCallback(early_stopping_patience=training.patience)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, callbacks=callbacks)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    stats = {"tokens": int(trainer.state.num_input_tokens_seen), "steps": trainer.state.global_step,
             "final_loss": float(losses[-1]) if losses else float(result.training_loss)}
    if early:
        stats |= {"best_step": int(trainer.state.best_global_step or trainer.state.global_step),
                  "best_heldout_loss": float(trainer.state.best_metric)}
    return stats


def continued_sft_trainer(ctx, dataset):
    """An SFTTrainer that continues pi_sft on `dataset` with the preset's shared lr and batch, until the budget
    stops it; its `.cost` counts this attempt's trained tokens (6N each) like the OPD trainer's."""
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from opd_bench.ledger import StageCost
    from opd_bench.logprobs import n_params

    from opd_bench.trainer import global_batch

    t = ctx.cfg.train
    micro, accumulation = global_batch(t)  # the preset's global batch whatever the number of processes
    args = sft_config(ctx.work, steps=t.max_steps or 10**9, batch_size=micro, accumulation=accumulation,
                      lr=t.lr, seed=ctx.cfg.seed, max_length=4 * t.max_new_tokens + 512, scheduler="constant",
                      max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, tokens_seen="non_padding")

    class CountTokens(TrainerCallback):  # the state of a resumed attempt counts earlier attempts' tokens too
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = int(state.num_input_tokens_seen)

        def on_step_end(self, args, state, control, **kwargs):
            tokens = int(state.num_input_tokens_seen) - self.start
            trainer.cost.tokens_trained, trainer.cost.flops = tokens, 6.0 * n * tokens

    model = ctx.load_model(ctx.world.student)
    n = n_params(model)
    trainer = SFTTrainer(model=model, args=args, processing_class=ctx.tokenizer, train_dataset=dataset,
                      callbacks=[CountTokens()])
    trainer.cost = StageCost(stage="train")
    return trainer
