"""Offline data stages, each built once, cached by its inputs (cache.build_stage) and charged to the
method that reads it:

  rollouts        pi_sft samples K completions per prompt (what Lightning OPD trains on)
  teacher-logps   a teacher scores those tokens once: only the sampled token's log-prob is stored
  ref-logps       the same for ExOPD's reference model, when an offline method needs it
  sampler-logps   the same for pi_sft itself (the IS ratio's denominator with method.ratio=sampler)
  teacher-samples teacher A answers fresh prompts (extra SFT data for a method that continues SFT)

Data are `datasets` Arrow folders (`data/`); each stage's manifest names the models, the tokenizer
fingerprint and a sha256 of the Arrow files, and `load_offline` checks all of them before training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from opd_bench.cache import build_stage, read_manifest
from opd_bench.config import RunConfig
from opd_bench.errors import UserError
from opd_bench.ledger import StageCost

Prompt = tuple[str, str]  # (problem id, user message)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what makes token ids mean the same thing: vocabulary, special tokens, chat template."""
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "eos": tokenizer.eos_token_id,
                       "pad": tokenizer.pad_token_id, "chat": tokenizer.chat_template}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_checksum(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.arrow")):
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_key(path: str | Path) -> str:
    """Cache-key name of a model: a stage folder's name (it holds its own hash) or an id / path as given."""
    path = Path(path)
    return path.name if (path / "stage.json").exists() else str(path)


def model_vocab_size(path: str | Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).get_text_config().vocab_size


# ----------------------------------------------------------------------------- sampling stages

def _sample_stage(cfg: RunConfig, name: str, model: str | Path, tokenizer_path: str | Path, prompts: list[Prompt],
                  n: int, temperature: float) -> tuple[Path, StageCost]:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from opd_bench.generation import SamplingParams, count_params, generate

    t = cfg.train
    inputs = {"model": model_key(model), "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
              "n_prompts": len(prompts), "n": n, "temperature": temperature, "max_new_tokens": t.max_new_tokens,
              "seed": cfg.seed}

    def build(folder: Path, cost: StageCost) -> dict:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        params = SamplingParams(n=n, temperature=temperature, max_new_tokens=t.max_new_tokens, seed=cfg.seed)
        samples = generate(model, [p for _, p in prompts], params, batch_size=cfg.eval.batch_size,
                           workers=cfg.eval.workers, threads=cfg.threads, desc=f"{name}: sampling",
                           backend=cfg.eval.backend)
        rows = [(pid, text, i, c) for (pid, text), cs in zip(prompts, samples) for i, c in enumerate(cs)]
        Dataset.from_dict({
            "problem_id": [r[0] for r in rows], "prompt": [r[1] for r in rows], "sample": [r[2] for r in rows],
            "prompt_ids": [r[3].prompt_ids for r in rows], "completion_ids": [r[3].token_ids for r in rows],
            "completion": [r[3].text for r in rows],
        }).save_to_disk(str(folder / "data"))
        tokens = sum(len(r[3].token_ids) for r in rows)
        cost.devices = cfg.eval.workers
        cost.generate(count_params(model), tokens)
        return {"model": str(model), "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": model_vocab_size(model),
                "rows": len(rows), "tokens": tokens, "checksum": data_checksum(folder / "data")}

    return build_stage(cfg.artifacts_dir, name, inputs, build)


def build_rollouts(cfg: RunConfig, student: str | Path, tokenizer: str | Path,
                   prompts: list[Prompt]) -> tuple[Path, StageCost]:
    """pi_sft samples train.rollouts_per_prompt completions per prompt at train.temperature."""
    return _sample_stage(cfg, "rollouts", student, tokenizer, prompts, cfg.train.rollouts_per_prompt,
                         cfg.train.temperature)


def build_teacher_samples(cfg: RunConfig, teacher: str | Path, tokenizer: str | Path,
                          prompts: list[Prompt]) -> tuple[Path, StageCost]:
    """The teacher answers fresh prompts at the SFT data's temperature (extra SFT data)."""
    return _sample_stage(cfg, "teacher-samples", teacher, tokenizer, prompts, 1, cfg.world.sft_temperature)


def load_samples(folder: Path):
    from datasets import load_from_disk

    return load_from_disk(str(Path(folder) / "data"))


# ----------------------------------------------------------------------------- scoring stage

def build_logps(cfg: RunConfig, rollouts: Path, model: str | Path, name: str = "teacher-logps",
                batch_size: int = 64) -> tuple[Path, StageCost]:
    """`model` scores every rollout token once; stores log p(y_t | s_t) of the sampled tokens only."""
    manifest = read_manifest(rollouts)["info"]
    inputs = {"rollouts": rollouts.name, "rollouts_checksum": manifest["checksum"], "model": model_key(model),
              "temperature": cfg.train.temperature}

    def build(folder: Path, cost: StageCost) -> dict:
        import torch
        from datasets import Dataset, Features, Sequence, Value

        from opd_bench.logprobs import completion_logps, n_params
        from opd_bench.models import load_model
        from trl.trainer.utils import pad

        if model_vocab_size(model) != manifest["vocab_size"]:
            raise UserError(f"{model} has vocab size {model_vocab_size(model)} but the rollouts were tokenized "
                            f"with {manifest['vocab_size']}: a teacher must share the student's tokenizer")
        net = load_model(model, cfg)
        data = load_samples(rollouts)
        p_ids, c_ids = data["prompt_ids"], data["completion_ids"]
        order = sorted(range(len(p_ids)), key=lambda i: (len(p_ids[i]) + len(c_ids[i]), i))  # less padding
        logps: list = [None] * len(order)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]

            def padded(rows, side, value):
                return pad([torch.tensor(r) for r in rows], padding_value=value, padding_side=side).to(net.device)

            prompt = [p_ids[i] for i in idx]
            completion = [c_ids[i] or [0] for i in idx]  # an empty completion scores nothing; keep shapes valid
            out = completion_logps(net, padded(prompt, "left", 0), padded([[1] * len(r) for r in prompt], "left", 0),
                                   padded(completion, "right", 0),
                                   padded([[1] * len(c_ids[i]) + [0] * (not c_ids[i]) for i in idx], "right", 0),
                                   temperature=cfg.train.temperature)
            for row, i in enumerate(idx):
                logps[i] = out[row, :len(c_ids[i])].tolist()
        dtype = "float64" if net.dtype == torch.float64 else "float32"
        Dataset.from_dict({"logps": logps}, features=Features({"logps": Sequence(Value(dtype))})
                          ).save_to_disk(str(folder / "data"))
        tokens = sum(len(p) + len(c) for p, c in zip(p_ids, c_ids))
        cost.score(n_params(net), tokens)
        return {"model": str(model), "rollouts": rollouts.name, "rollouts_checksum": manifest["checksum"],
                "vocab_size": manifest["vocab_size"], "rows": len(logps), "checksum": data_checksum(folder / "data")}

    return build_stage(cfg.artifacts_dir, name, inputs, build)


# ----------------------------------------------------------------------------- reading back

def check_tokenizers(tokenizer, student: str | Path, models: tuple = (), rollouts: Path | None = None) -> None:
    """Student, teachers and rollouts must share one tokenizer and vocabulary (else the ids mean other things).

    Checked: every model's vocabulary size (equal, and at least the tokenizer's), the tokenizer saved with a
    model folder when there is one, and the tokenizer fingerprint the rollouts were built with.
    """
    from transformers import AutoTokenizer

    fingerprint = tokenizer_fingerprint(tokenizer)
    sizes = {str(m): model_vocab_size(m) for m in (student, *models)}
    if len(set(sizes.values())) > 1 or min(sizes.values()) < len(tokenizer):
        raise UserError(f"vocabulary mismatch: {sizes} (tokenizer: {len(tokenizer)} tokens); student and teachers "
                        f"must share one tokenizer")
    for model in (student, *models):
        if (Path(model) / "tokenizer_config.json").exists() and \
                tokenizer_fingerprint(AutoTokenizer.from_pretrained(model)) != fingerprint:
            raise UserError(f"{model} was saved with another tokenizer than the student's; "
                            f"student and teachers must share one tokenizer")
    if rollouts is not None and read_manifest(rollouts)["info"]["tokenizer"] != fingerprint:
        raise UserError(f"the rollouts in {rollouts} were tokenized with another tokenizer than the student's; "
                        f"delete that stage folder or fix world.hf.tokenizer")


def load_offline(rollouts: Path, scored: dict[str, Path]):
    """The training dataset: prompt ids, completion ids and each scored column (`teacher_logps`, `ref_logps`,
    `sampler_logps` -> its stage folder), checksums verified."""
    data = load_samples(rollouts).select_columns(["problem_id", "prompt_ids", "completion_ids"])
    info = read_manifest(rollouts)["info"]
    if data_checksum(Path(rollouts) / "data") != info["checksum"]:
        raise UserError(f"{rollouts} changed since it was built (checksum mismatch); delete the folder to rebuild it")
    for column, folder in sorted(scored.items()):
        manifest = read_manifest(folder)["info"]
        if manifest["rollouts_checksum"] != info["checksum"] or manifest["rows"] != len(data):
            raise UserError(f"{folder} scored other rollouts than {rollouts}; delete it to rebuild")
        if data_checksum(Path(folder) / "data") != manifest["checksum"]:
            raise UserError(f"{folder} changed since it was built (checksum mismatch); delete the folder")
        data = data.add_column(column, load_samples(folder)["logps"])
    return data
