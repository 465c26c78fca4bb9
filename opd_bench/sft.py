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


def train_sft(model, tokenizer, dataset, training: Training, out_dir: Path, *, seed: int,
              max_steps: int | None = None, max_length: int = 256, callbacks: list | None = None,
              lr_scheduler: str = "cosine") -> dict:
    """Train `model` in place; returns the tokens processed and the last logged loss.

    `callbacks` are TRL/transformers TrainerCallbacks (e.g. a budget that stops training).
    """
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out_dir / "trainer"),
        max_steps=max_steps or training.steps,
        per_device_train_batch_size=training.batch_size,
        learning_rate=training.lr,
        lr_scheduler_type=lr_scheduler,  # cosine: annealed to 0, the model ends converged for its budget
        warmup_steps=training.warmup_steps,
        weight_decay=0.0,
        adam_beta2=0.98,
        max_grad_norm=1.0,
        max_length=max_length,
        use_cpu=_use_cpu(), bf16=False, gradient_checkpointing=False,  # see reference/trl.md
        save_strategy="no", report_to=[], logging_steps=50, seed=seed, data_seed=seed,
        dataloader_num_workers=0, include_num_input_tokens_seen="all",
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=callbacks)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"tokens": int(trainer.state.num_input_tokens_seen), "steps": trainer.state.global_step,
            "final_loss": float(losses[-1]) if losses else float(result.training_loss)}


def _use_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()
