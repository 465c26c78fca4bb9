"""Loading a run's tokenizer and models, by Hugging Face id or local folder (the micro world's models are saved
with save_pretrained, so one loading path serves every world)."""

from __future__ import annotations

from pathlib import Path

from opd_bench.config import RunConfig
from opd_bench.errors import UserError


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.padding_side = "left"  # decoder-only generation (and TRL) pad prompts on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, cfg: RunConfig):
    """A causal LM in the preset's dtype (auto: bf16 on GPU, fp32 on CPU), on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    gpu = torch.cuda.is_available()
    dtype = {"auto": torch.bfloat16 if gpu else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32, "float64": torch.float64}[cfg.world.hf.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as exc:
        raise UserError(f"cannot load model {path!r}: {str(exc).splitlines()[0]}") from None
    return model.to("cuda") if gpu else model
