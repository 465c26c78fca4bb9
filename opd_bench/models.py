"""Loading a run's tokenizer and models, by Hugging Face id or local folder (the micro world's models are saved
with save_pretrained, so one loading path serves every world).

Precision (the preset's `world.hf.dtype: auto`): the student trains in fp32 master weights (bf16 compute comes from
the trainer's autocast / FSDP2 mixed precision: pure bf16 AdamW at lr 2e-6 rounds most updates away); frozen models
(teacher, reference, offline scoring) are bf16 on GPU. On CPU everything is fp32; an explicit dtype (float64 for
exactness tests) applies to every model.

Placement: `device="auto"` puts a model on this process's GPU (LOCAL_RANK under a launcher, not cuda:0 for every
rank); the trainer loads with `device=None` after its training arguments exist, so the launcher's strategy places
it (DDP: the trainer moves it to its rank's device; ZeRO-3: from_pretrained partitions it at load; FSDP2: the
accelerator shards it).
"""

from __future__ import annotations

import os
from pathlib import Path

from opd_bench.config import RunConfig
from opd_bench.errors import UserError

ROLES = ("frozen", "student")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"  # decoder-only generation (and TRL) pad prompts on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_dtype(cfg: RunConfig, role: str = "frozen"):
    """The dtype a model of this role loads in (see the module docstring)."""
    import torch

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if cfg.world.hf.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and role == "frozen" else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}[cfg.world.hf.dtype]


def local_device():
    """This process's device: its launcher-assigned GPU (LOCAL_RANK), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def load_model(path: str | Path, cfg: RunConfig, role: str = "frozen", device="auto"):
    """A causal LM in its role's dtype; on this process's GPU when there is one (`device="auto"`), where the
    caller says, or left where from_pretrained put it (`device=None`: the trainer places or shards it)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=model_dtype(cfg, role))
    except OSError as exc:
        raise UserError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from None
    if device == "auto":
        device = local_device()
    return model if device is None else model.to(device)
