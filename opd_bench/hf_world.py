"""The paper presets' world: models and prompts by Hugging Face id or local folder.

A paper preset (`world.kind: hf`) names pi_sft (the SFT'd student OPD starts from), teacher A (the
teacher that wrote the SFT data), optionally teacher B, and a prompts dataset. Prompts may be a
`datasets` id, a saved dataset folder, or a .json/.jsonl/.parquet/.csv file; the prompt column may
hold text or chat messages (DAPO-Math-17k's format), from which the last user message is taken.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from opd_bench.config import HFWorld
from opd_bench.errors import UserError


def _read_dataset(source: str, split: str):
    import datasets

    path = Path(source)
    if path.is_dir():
        data = datasets.load_from_disk(str(path))
        return data[split] if isinstance(data, datasets.DatasetDict) else data
    if path.is_file():
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
        if kind is None:
            raise UserError(f"prompts file {path} is not .json/.jsonl/.parquet/.csv")
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as exc:  # hub errors come in many types; the user needs the one line
        raise UserError(f"cannot load prompts {source!r} (split {split!r}): {str(exc).splitlines()[0]}") from None


def prompt_text(value) -> str:
    """Text of a prompt cell: a string, or chat messages (the last user message)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[0], dict):
        users = [m["content"] for m in value if m.get("role") == "user"]
        if users:
            return users[-1]
    raise UserError(f"cannot read a prompt from {str(value)[:80]!r}: expected text or chat messages")


def load_prompts(hf: HFWorld, n: int, tag: str) -> list[tuple[str, str]]:
    """Up to n (id, prompt) pairs, shuffled with a seed named by `tag` (distinct stages get distinct draws)."""
    data = _read_dataset(hf.prompts, hf.prompts_split)
    if hf.prompt_field not in data.column_names:
        raise UserError(f"prompts {hf.prompts!r} have no column {hf.prompt_field!r} (columns: {data.column_names}); "
                        f"set world.hf.prompt_field")
    texts = [prompt_text(v) for v in data[hf.prompt_field]]
    ids = [f"{hashlib.sha256(t.encode()).hexdigest()[:12]}" for t in texts]
    order = list(range(len(texts)))
    random.Random(tag).shuffle(order)
    return [(ids[i], texts[i]) for i in order[:n]]
