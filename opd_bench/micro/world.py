"""Build the micro world, stage by stage, each stage cached by a hash of its inputs.

  tokenizer     the character tokenizer (saved with save_pretrained)
  teacher-a/b   Qwen3-style decoders trained from scratch by SFT on style-A / style-B solutions;
                built in parallel, one process and one core each
  sft-data      teacher A's samples (temperature 0.7) on fresh training prompts
  sft-student   the smaller student trained on sft-data to convergence: pi_sft (cosine-annealed over its steps,
                or, with student_training.eval_every, early-stopped on held-out teacher samples' loss)
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from opd_bench.cache import build_stage, is_built, stage_dir
from opd_bench.config import Arch, RunConfig, Training
from opd_bench.ledger import StageCost

TOKENIZER_VERSION = 1
DATA_VERSION = 1  # bump when the generators in problems.py change
# Libraries whose version changes a built stage's bytes (training, sampling, tokenizer files): part of every
# stage key, so a world built under other versions is a different world, not a silent stand-in (constraints.txt).
LIBRARIES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers")


def library_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in LIBRARIES}


@dataclass
class World:
    tokenizer: Path
    teacher_a: Path
    teacher_b: Path
    sft_data: Path
    sft_student: Path
    costs: list[StageCost]

    def stages(self) -> dict[str, Path]:
        return {"tokenizer": self.tokenizer, "teacher-a": self.teacher_a, "teacher-b": self.teacher_b,
                "sft-data": self.sft_data, "sft-student": self.sft_student}


# ----------------------------------------------------------------------------- stage inputs

def _tokenizer_inputs() -> dict:
    return {"version": TOKENIZER_VERSION, "libraries": library_versions()}


def _teacher_inputs(cfg: RunConfig, style: str) -> dict:
    w = cfg.world
    return {"tokenizer": stage_dir(cfg.artifacts_dir, "tokenizer", _tokenizer_inputs()).name,
            "style": style, "arch": w.teacher.model_dump(), "training": w.teacher_training.key(),
            "math_fraction": w.math_fraction, "data_version": DATA_VERSION, "seed": cfg.seed,
            "libraries": library_versions(),
            **({"corrections": w.corrections} if w.corrections else {})}  # absent at 0: keys stay as they were


def student_seed(cfg: RunConfig) -> int:
    """pi_sft's own seed (its SFT data and training); the teachers always use the world's."""
    return cfg.seed if cfg.world.student_seed is None else cfg.world.student_seed


def _sft_data_inputs(cfg: RunConfig) -> dict:
    w = cfg.world
    return {"teacher": stage_dir(cfg.artifacts_dir, "teacher-a", _teacher_inputs(cfg, "A")).name,
            "prompts": w.sft_prompts, "temperature": w.sft_temperature, "max_new_tokens": w.max_new_tokens,
            "math_fraction": w.math_fraction, "data_version": DATA_VERSION, "seed": student_seed(cfg),
            "libraries": library_versions(),
            **({"heldout": w.sft_heldout} if w.sft_heldout else {}),  # absent at 0: keys stay as they were
            **({"batch_size": w.sample_batch_size} if w.sample_batch_size != 128 else {})}  # 128: every world before


def _student_inputs(cfg: RunConfig) -> dict:
    w = cfg.world
    return {"sft_data": stage_dir(cfg.artifacts_dir, "sft-data", _sft_data_inputs(cfg)).name,
            "arch": w.student.model_dump(), "training": w.student_training.key(), "seed": student_seed(cfg),
            "libraries": library_versions()}


def stage_paths(cfg: RunConfig) -> dict[str, Path]:
    """Where each stage of this configuration lives (built or not)."""
    root = cfg.artifacts_dir
    return {"tokenizer": stage_dir(root, "tokenizer", _tokenizer_inputs()),
            "teacher-a": stage_dir(root, "teacher-a", _teacher_inputs(cfg, "A")),
            "teacher-b": stage_dir(root, "teacher-b", _teacher_inputs(cfg, "B")),
            "sft-data": stage_dir(root, "sft-data", _sft_data_inputs(cfg)),
            "sft-student": stage_dir(root, "sft-student", _student_inputs(cfg))}


# ----------------------------------------------------------------------------- data

def training_mix(n: int, math_fraction: float, seed: str) -> list:
    from opd_bench.micro.problems import train_problems

    n_math = round(n * math_fraction)
    problems = train_problems("micro-math", n_math, seed) + train_problems("micro-code", n - n_math, seed)
    random.Random(seed).shuffle(problems)
    return problems


# ----------------------------------------------------------------------------- builders

def _build_tokenizer(folder: Path, cost: StageCost) -> dict:
    from opd_bench.micro.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.save_pretrained(folder)
    return {"vocab_size": len(tokenizer)}


def _train_from_scratch(folder: Path, cost: StageCost, tokenizer_dir: Path, arch: Arch, training: Training,
                        prompts: list[str], completions: list[str], seed: int, threads: int,
                        unlearned: list | None = None, heldout: tuple[list[str], list[str]] | None = None) -> dict:
    import torch
    from transformers import AutoTokenizer

    from opd_bench.micro.models import new_model
    from opd_bench.sft import tokenize_pairs, train_sft

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = new_model(tokenizer, seed, **arch.model_dump())
    n_params = sum(p.numel() for p in model.parameters())
    data = tokenize_pairs(tokenizer, prompts, completions, unlearned)
    eval_data = tokenize_pairs(tokenizer, *heldout) if heldout and training.eval_every else None
    stats = train_sft(model, tokenizer, data, training, folder, seed=seed, eval_dataset=eval_data)
    _drop_trainer_folder(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cost.train(n_params, stats["tokens"])  # held-out evaluations are forward passes, a small share: not counted
    return {"params": n_params, **stats}


def _build_teacher(cfg_json: str, style: str) -> tuple[Path, StageCost]:
    """Runs in a worker process (one core)."""
    from opd_bench.micro.problems import with_corrections

    cfg = RunConfig.model_validate_json(cfg_json)
    w = cfg.world
    tokenizer_dir = stage_paths(cfg)["tokenizer"]

    def build(folder: Path, cost: StageCost) -> dict:
        problems = training_mix(w.teacher_training.examples, w.math_fraction, f"teacher-{cfg.seed}")
        rng = random.Random(f"corrections-{cfg.seed}")
        texts, unlearned = zip(*(with_corrections(p.solutions[style], style, rng, w.corrections)
                                 if p.task == "micro-math" else (p.solutions[style], []) for p in problems))
        return _train_from_scratch(folder, cost, tokenizer_dir, w.teacher, w.teacher_training,
                                   [p.prompt for p in problems], list(texts), cfg.seed, cfg.threads, list(unlearned))

    return build_stage(cfg.artifacts_dir, f"teacher-{style.lower()}", _teacher_inputs(cfg, style), build)


def _build_sft_data(cfg: RunConfig, teacher_dir: Path) -> tuple[Path, StageCost]:
    from datasets import Dataset

    from opd_bench.generation import SamplingParams, count_params, generate

    w = cfg.world

    def build(folder: Path, cost: StageCost) -> dict:
        # A seed distinct from the teachers' data: fresh prompts drawn from the same distribution; the held-out
        # ones (early stopping's) are a draw of their own, so sft_prompts' rows are the same with or without them.
        seed = student_seed(cfg)
        problems = training_mix(w.sft_prompts, w.math_fraction, f"sft-data-{seed}")
        heldout = training_mix(w.sft_heldout, w.math_fraction, f"sft-heldout-{seed}") if w.sft_heldout else []
        problems += heldout
        params = SamplingParams(n=1, temperature=w.sft_temperature, max_new_tokens=w.max_new_tokens, seed=seed)
        samples = generate(teacher_dir, [p.prompt for p in problems], params, batch_size=w.sample_batch_size,
                           workers=cfg.eval.workers, threads=cfg.threads, desc="sft-data: teacher A samples")
        rows = {"problem_id": [p.id for p in problems], "task": [p.task for p in problems],
                "prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems],
                "completion": [s[0].text for s in samples],
                "heldout": [False] * w.sft_prompts + [True] * len(heldout)}
        Dataset.from_dict(rows).save_to_disk(str(folder / "data"))
        cost.devices = cfg.eval.workers
        cost.generate(count_params(teacher_dir), sum(len(s[0].token_ids) for s in samples))
        return {"rows": len(problems)}

    return build_stage(cfg.artifacts_dir, "sft-data", _sft_data_inputs(cfg), build)


def load_sft_data(folder: Path, heldout: bool = False):
    """pi_sft's own SFT data (heldout=True: the teacher samples its early stopping read instead)."""
    from datasets import load_from_disk

    data = load_from_disk(str(folder / "data"))
    if "heldout" not in data.column_names:  # a world built without held-out samples
        return data.select([]) if heldout else data
    return data.filter(lambda flags: [f == heldout for f in flags], input_columns="heldout", batched=True)


def _build_student(cfg: RunConfig, paths: dict[str, Path]) -> tuple[Path, StageCost]:
    w = cfg.world

    def build(folder: Path, cost: StageCost) -> dict:
        data, heldout = load_sft_data(paths["sft-data"]), load_sft_data(paths["sft-data"], heldout=True)
        if w.student_training.eval_every and not len(heldout):
            from opd_bench.errors import UserError

            raise UserError("world.student_training.eval_every (early stopping) needs held-out teacher samples: "
                            "set world.sft_heldout, e.g. --set world.sft_heldout=200")
        return _train_from_scratch(folder, cost, paths["tokenizer"], w.student, w.student_training,
                                   data["prompt"], data["completion"], student_seed(cfg), cfg.threads,
                                   heldout=(heldout["prompt"], heldout["completion"]) if len(heldout) else None)

    return build_stage(cfg.artifacts_dir, "sft-student", _student_inputs(cfg), build)


def _drop_trainer_folder(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder / "trainer", ignore_errors=True)


def prepare(cfg: RunConfig) -> World:
    """Build (or reuse) every stage of the micro world."""
    paths = stage_paths(cfg)
    costs = []
    _, cost = build_stage(cfg.artifacts_dir, "tokenizer", _tokenizer_inputs(), _build_tokenizer)
    costs.append(cost)
    cfg_json = cfg.model_dump_json()
    both_missing = not is_built(paths["teacher-a"]) and not is_built(paths["teacher-b"])
    if both_missing and cfg.eval.workers >= 2:  # the two teachers train side by side, one core each
        with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_build_teacher, cfg_json, s) for s in ("A", "B")]
            costs += [fut.result()[1] for fut in futures]
    else:
        costs += [_build_teacher(cfg_json, s)[1] for s in ("A", "B")]
    costs.append(_build_sft_data(cfg, paths["teacher-a"])[1])
    costs.append(_build_student(cfg, paths)[1])
    return World(*(paths[k] for k in ("tokenizer", "teacher-a", "teacher-b", "sft-data", "sft-student")), costs)


def describe(world: World) -> str:
    return json.dumps({k: str(v) for k, v in world.stages().items()}, indent=1)
