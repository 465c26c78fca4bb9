"""Offline data stages, each built once, cached by its inputs (cache.build_stage) and charged to the
method that reads it:

  rollouts        pi_sft samples K completions per prompt (what Lightning OPD trains on)
  teacher-logps   a teacher scores those tokens once: only the sampled token's log-prob is stored
  ref-logps       the same for ExOPD's reference model, when an offline method needs it
  sampler-logps   the same for pi_sft itself (the IS ratio's denominator with method.ratio=sampler)
  teacher-samples teacher A answers fresh prompts (extra SFT data for a method that continues SFT)

At scale (a 32B teacher scoring 4k-token rows), each stage is:
- parquet shards: `data/shard-00000.parquet`, ... with one `shard-*.json` each (rows, tokens, sha256); the
  manifest (`stage.json`) lists every shard and a checksum over them, and `load_offline` verifies all of it
  (models, tokenizer fingerprint, rows, checksums) before training;
- streamed: a shard is read, scored and written before the next one is read; scoring is chunked
  (`completion_logps(..., chunked=True)`: TRL's chunked kernel, never the dense tokens x vocabulary logits);
- sharded over ranks with `collective=True`: under a launch (the run's resume.Ranks, or a torch.distributed
  group) every rank calls the builder; rank r takes shards r, r + W, ... and rank 0 writes the manifest after a
  barrier. Without it (the default) the caller's rank builds every shard (e.g. rank 0 while the others wait, as
  training.TrainContext.stage does). vLLM sampling: one engine per `vllm.eval_tensor_parallel` GPUs, each in a
  child process (memory returned when it ends);
- resumable shard by shard: a stage killed after shard k resumes at shard k + 1 (its folder `.tmp-<stage>-<key>/`
  outlives the crash), with the same final data as an uninterrupted build.
Scored stages mirror the rollouts' shards (shard k of teacher-logps scores shard k of the rollouts). A shard's
samples depend only on its prompts and the seed (HF: its batches are seeded by shard and batch; vLLM: each prompt by
its index), so the data do not depend on how many ranks built them.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path

from opd_bench.cache import build_stage, dist_info, note_progress, read_manifest
from opd_bench.config import RunConfig
from opd_bench.errors import UserError
from opd_bench.ledger import StageCost
from opd_bench.resume import crash_point

Prompt = tuple[str, str]  # (problem id, user message)

FORMAT = "parquet-shards-1"
SHARD_ROWS = 4096  # rows per shard (rollouts: prompts x K); the micro presets' rollouts fit in one


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what makes token ids mean the same thing: vocabulary, special tokens, chat template."""
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items()), "eos": tokenizer.eos_token_id,
                       "pad": tokenizer.pad_token_id, "chat": tokenizer.chat_template}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_key(path: str | Path) -> str:
    """Cache-key name of a model: a stage folder's name (it holds its own hash) or an id / path as given."""
    path = Path(path)
    return path.name if (path / "stage.json").exists() else str(path)


def model_vocab_size(path: str | Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).get_text_config().vocab_size


# ----------------------------------------------------------------------------- shards


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shards_checksum(shards: list[dict]) -> str:
    return hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest()


def data_checksum(folder: Path) -> str:
    """The checksum of a stage's data folder: over its parquet shards' sha256, in shard order."""
    return shards_checksum([{"sha256": file_sha256(p)} for p in sorted(Path(folder).glob("shard-*.parquet"))])


def _shard_file(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def _arrow_table(columns: dict, types: dict | None = None):
    import pyarrow as pa

    types = types or {}
    return pa.table({name: pa.array(values, type=types.get(name)) for name, values in columns.items()})


def write_shard(data: Path, k: int, columns: dict, types: dict | None = None, **extra) -> dict:
    """Write shard k (parquet, atomically: a crash leaves it absent or whole), then its json record."""
    import pyarrow.parquet as pq

    table = _arrow_table(columns, types)
    path = data / _shard_file(k)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    record = {"file": path.name, "rows": table.num_rows, "sha256": file_sha256(path), **extra}
    meta = path.with_suffix(".json")
    tmp = meta.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, meta)
    return record


def done_shards(data: Path) -> dict[int, dict]:
    """The shards already written whole (their json record present and their sha256 matching)."""
    done = {}
    for meta in sorted(Path(data).glob("shard-*.json")):
        record = json.loads(meta.read_text())
        path = Path(data) / record["file"]
        if path.exists() and file_sha256(path) == record["sha256"]:
            done[int(meta.stem.split("-")[1])] = record
    return done


def save_rows(folder: Path, columns: dict, shard_rows: int = SHARD_ROWS) -> dict:
    """Write rows (a dict of equal-length columns) as the shards of a stage folder; the manifest info's data part."""
    data = Path(folder) / "data"
    data.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    shards = [write_shard(data, k, {c: v[start:start + shard_rows] for c, v in columns.items()}, _id_types())
              for k, start in enumerate(range(0, max(n, 1), shard_rows))]
    return {"format": FORMAT, "rows": n, "shards": shards, "checksum": shards_checksum(shards)}


def _finished_shards(tmp: Path, count: int) -> list[dict]:
    done = done_shards(tmp / "data")
    missing = [k for k in range(count) if k not in done]
    if missing:
        raise RuntimeError(f"{tmp.name}: shards {missing[:8]} were not built (a rank failed); run again to resume")
    return [done[k] for k in range(count)]


def verify(stage: Path, info: dict) -> None:
    """Every shard the manifest lists is present and unchanged, and the checksum over them matches."""
    data = Path(stage) / "data"
    shards = info.get("shards")
    if shards is None:
        raise UserError(f"{stage} was built in an older format; delete the folder to rebuild it")
    for shard in shards:
        path = data / shard["file"]
        if not path.exists() or file_sha256(path) != shard["sha256"]:
            raise UserError(f"{stage} changed since it was built (checksum mismatch in {shard['file']}); "
                            f"delete the folder to rebuild it")
    if shards_checksum(shards) != info["checksum"]:
        raise UserError(f"{stage} changed since it was built (checksum mismatch); delete the folder to rebuild it")


def read_shard(stage: Path, shard: dict, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    return pq.read_table(Path(stage) / "data" / shard["file"], columns=columns)


def _dataset(table):
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table))


def _id_types():
    import pyarrow as pa

    return {"prompt_ids": pa.list_(pa.int32()), "completion_ids": pa.list_(pa.int32()), "sample": pa.int32()}


# ----------------------------------------------------------------------------- sampling stages


def _write_sample_shard(data: Path, name: str, k: int, rows: list[Prompt], samples: list[list[tuple]]) -> dict:
    """Shard k of a sampling stage: one row per (prompt, sample); samples[i] = [(text, completion ids, prompt ids)]."""
    out = [(pid, text, j, s) for (pid, text), ss in zip(rows, samples) for j, s in enumerate(ss)]
    record = write_shard(data, k, {
        "problem_id": [r[0] for r in out], "prompt": [r[1] for r in out], "sample": [r[2] for r in out],
        "prompt_ids": [list(r[3][2]) for r in out], "completion_ids": [list(r[3][1]) for r in out],
        "completion": [r[3][0] for r in out]}, _id_types(), tokens=sum(len(r[3][1]) for r in out), pid=os.getpid())
    crash_point(f"{name}:shard-{k}")
    return record


def _vllm_shard_writer(data: Path, name: str, item, out) -> None:
    """on_result of the child engine: write the item's shard as soon as it is sampled."""
    samples = [[(text, tokens, p) for text, tokens in ss] for ss, p in zip(out, item.prompt_ids)]
    _write_sample_shard(data, name, item.key, item.meta["rows"], samples)


def _ranks(collective: bool) -> tuple[int, int]:
    return dist_info() if collective else (0, 1)


def _sample_stage(cfg: RunConfig, name: str, model: str | Path, tokenizer_path: str | Path, prompts: list[Prompt],
                  n: int, temperature: float, shard_rows: int | None = None,
                  collective: bool = False) -> tuple[Path, StageCost]:
    from opd_bench.generation import SamplingParams, count_params

    t, backend = cfg.train, cfg.eval.backend
    per_shard = max(1, (shard_rows or SHARD_ROWS) // n)  # prompts per shard
    shards = [prompts[i:i + per_shard] for i in range(0, len(prompts), per_shard)] or [[]]
    inputs = {"model": model_key(model), "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16],
              "n_prompts": len(prompts), "n": n, "temperature": temperature, "max_new_tokens": t.max_new_tokens,
              "seed": cfg.seed, "format": FORMAT, "shard_prompts": per_shard, "backend": backend}
    params = SamplingParams(n=n, temperature=temperature, max_new_tokens=t.max_new_tokens, seed=cfg.seed)
    tp = cfg.vllm.eval_tensor_parallel

    def build(folder: Path, cost: StageCost) -> None:
        rank, world = _ranks(collective)
        data = folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        done = done_shards(data)
        if backend == "vllm":
            _sample_vllm(cfg, name, model, shards, per_shard, params, data, done, rank, world, tp)
            return
        from opd_bench.generation import generate

        for k in range(rank, len(shards), world):
            if k in done:
                continue
            samples = generate(model, [p for _, p in shards[k]], params, batch_size=cfg.eval.batch_size,
                               workers=cfg.eval.workers, threads=cfg.threads, desc=f"{name}: sampling shard {k}",
                               backend="hf", shard=k)
            _write_sample_shard(data, name, k, shards[k],
                                [[(c.text, c.token_ids, c.prompt_ids) for c in cs] for cs in samples])
            note_progress(folder)

    def finish(folder: Path, cost: StageCost) -> dict:
        from transformers import AutoTokenizer

        records = _finished_shards(folder, len(shards))
        tokens = sum(r["tokens"] for r in records)
        world = _ranks(collective)[1]
        cost.devices = max(world, tp) if backend == "vllm" else world * cfg.eval.workers
        cost.generate(count_params(model), tokens)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        return {"format": FORMAT, "model": str(model), "tokenizer": tokenizer_fingerprint(tokenizer),
                "vocab_size": model_vocab_size(model), "rows": sum(r["rows"] for r in records), "tokens": tokens,
                "backend": backend, "shards": [{k: r[k] for k in ("file", "rows", "sha256", "tokens")} for r in records],
                "checksum": shards_checksum(records)}

    return build_stage(cfg.artifacts_dir, name, inputs, build, finish=finish, resumable=True, collective=collective)


def _sample_vllm(cfg, name, model, shards, per_shard, params, data, done, rank, world, tp) -> None:
    """This rank's shards on one vLLM engine in a child process (ranks r with r % tp != 0 lend their GPUs to the
    engine of rank r - r % tp); each shard is written by the child as soon as it is sampled."""
    from transformers import AutoTokenizer

    from opd_bench import vllm_backend
    from opd_bench.generation import prompt_token_ids

    if rank % tp:
        return
    engines = max(1, world // tp)
    todo = [k for k in range(rank // tp, len(shards), engines) if k not in done]
    if not todo:
        return
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    sampling = vllm_backend.Sampling(n=params.n, temperature=params.temperature, top_p=params.top_p,
                                     max_tokens=params.max_new_tokens)
    items = [vllm_backend.WorkItem(
        key=k, prompt_ids=prompt_token_ids(tokenizer, [p for _, p in shards[k]]),
        seeds=vllm_backend.prompt_seeds(params.seed, range(k * per_shard, k * per_shard + len(shards[k]))),
        sampling=sampling, meta={"rows": shards[k]}) for k in todo]
    settings = vllm_backend.EngineSettings.of(cfg.vllm, seed=params.seed)
    vllm_backend.run_engine(model, settings, items, on_result=partial(_vllm_shard_writer, data, name), rank=rank)


def build_rollouts(cfg: RunConfig, student: str | Path, tokenizer: str | Path, prompts: list[Prompt],
                   shard_rows: int | None = None, collective: bool = False) -> tuple[Path, StageCost]:
    """pi_sft samples train.rollouts_per_prompt completions per prompt at train.temperature."""
    return _sample_stage(cfg, "rollouts", student, tokenizer, prompts, cfg.train.rollouts_per_prompt,
                         cfg.train.temperature, shard_rows, collective)


def build_teacher_samples(cfg: RunConfig, teacher: str | Path, tokenizer: str | Path, prompts: list[Prompt],
                          shard_rows: int | None = None, collective: bool = False) -> tuple[Path, StageCost]:
    """The teacher answers fresh prompts at the SFT data's temperature (extra SFT data)."""
    return _sample_stage(cfg, "teacher-samples", teacher, tokenizer, prompts, 1, cfg.world.sft_temperature,
                         shard_rows, collective)


def load_samples(folder: Path):
    """A sampling stage's rows as a `datasets.Dataset` (checksums verified)."""
    import pyarrow as pa

    info = read_manifest(folder)["info"]
    verify(folder, info)
    return _dataset(pa.concat_tables([read_shard(folder, s) for s in info["shards"]]))


# ----------------------------------------------------------------------------- scoring stage


def _score_rows(net, p_ids: list, c_ids: list, batch_size: int, temperature: float) -> list[list[float]]:
    """Sampled-token log-probs of each row's completion, chunked (never the (tokens, vocabulary) logits)."""
    import torch
    from trl.trainer.utils import pad

    from opd_bench.logprobs import completion_logps

    order = sorted(range(len(p_ids)), key=lambda i: (len(p_ids[i]) + len(c_ids[i]), i))  # less padding
    logps: list = [None] * len(order)
    device = next(net.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]

        def padded(rows, side):
            return pad([torch.tensor(r) for r in rows], padding_value=0, padding_side=side).to(device)

        prompt = [p_ids[i] for i in idx]
        completion = [c_ids[i] or [0] for i in idx]  # an empty completion scores nothing; keep shapes valid
        out = completion_logps(net, padded(prompt, "left"), padded([[1] * len(r) for r in prompt], "left"),
                               padded(completion, "right"),
                               padded([[1] * len(c_ids[i]) + [0] * (not c_ids[i]) for i in idx], "right"),
                               temperature=temperature, chunked=True)
        for row, i in enumerate(idx):
            logps[i] = out[row, :len(c_ids[i])].tolist()
    return logps


def build_logps(cfg: RunConfig, rollouts: Path, model: str | Path, name: str = "teacher-logps",
                batch_size: int = 64, collective: bool = False) -> tuple[Path, StageCost]:
    """`model` scores every rollout token once; stores log p(y_t | s_t) of the sampled tokens only, one shard per
    rollouts shard (see the module docstring: chunked, streamed, sharded over ranks, resumable)."""
    manifest = read_manifest(rollouts)["info"]
    shards = manifest.get("shards")
    if shards is None:
        raise UserError(f"{rollouts} was built in an older format; delete the folder to rebuild it")
    inputs = {"rollouts": rollouts.name, "rollouts_checksum": manifest["checksum"], "model": model_key(model),
              "temperature": cfg.train.temperature, "format": FORMAT}

    def build(folder: Path, cost: StageCost) -> None:
        import pyarrow as pa
        import torch

        from opd_bench.models import load_model

        if model_vocab_size(model) != manifest["vocab_size"]:
            raise UserError(f"{model} has vocab size {model_vocab_size(model)} but the rollouts were tokenized "
                            f"with {manifest['vocab_size']}: a teacher must share the student's tokenizer")
        rank, world = _ranks(collective)
        data = folder / "data"
        data.mkdir(parents=True, exist_ok=True)
        done = done_shards(data)
        todo = [k for k in range(rank, len(shards), world) if k not in done]
        if not todo:
            return
        net = load_model(model, cfg).eval()
        float64 = next(net.parameters()).dtype == torch.float64
        for k in todo:  # streamed: one shard in memory at a time
            table = read_shard(rollouts, shards[k], ["prompt_ids", "completion_ids"])
            p_ids, c_ids = table.column("prompt_ids").to_pylist(), table.column("completion_ids").to_pylist()
            logps = _score_rows(net, p_ids, c_ids, batch_size, cfg.train.temperature)
            write_shard(data, k, {"logps": logps}, {"logps": pa.list_(pa.float64() if float64 else pa.float32())},
                        tokens=sum(len(p) + len(c) for p, c in zip(p_ids, c_ids)),
                        dtype="float64" if float64 else "float32", pid=os.getpid())
            note_progress(folder)
            crash_point(f"{name}:shard-{k}")
        del net
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def finish(folder: Path, cost: StageCost) -> dict:
        from opd_bench.generation import count_params

        records = _finished_shards(folder, len(shards))
        for record, shard in zip(records, shards):
            if record["rows"] != shard["rows"]:
                raise RuntimeError(f"{folder.name}/{record['file']}: {record['rows']} rows for {shard['rows']}")
        cost.devices = _ranks(collective)[1]
        cost.score(count_params(model), sum(r["tokens"] for r in records))
        return {"format": FORMAT, "model": str(model), "rollouts": rollouts.name,
                "rollouts_checksum": manifest["checksum"], "vocab_size": manifest["vocab_size"],
                "rows": sum(r["rows"] for r in records), "dtype": records[0].get("dtype", "float32"),
                "shards": [{k: r[k] for k in ("file", "rows", "sha256", "tokens")} for r in records],
                "checksum": shards_checksum(records)}

    return build_stage(cfg.artifacts_dir, name, inputs, build, finish=finish, resumable=True, collective=collective)


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
    """The training dataset (a `datasets.Dataset`): prompt ids, completion ids and each scored column
    (`teacher_logps`, `ref_logps`, `sampler_logps` -> its stage folder), models, rows and checksums verified."""
    import pyarrow as pa

    info = read_manifest(rollouts)["info"]
    verify(rollouts, info)
    scored_info = {}
    for column, folder in sorted(scored.items()):
        manifest = read_manifest(folder)["info"]
        if manifest["rollouts_checksum"] != info["checksum"] or manifest["rows"] != info["rows"] \
                or [s["rows"] for s in manifest.get("shards", [])] != [s["rows"] for s in info["shards"]]:
            raise UserError(f"{folder} scored other rollouts than {rollouts}; delete it to rebuild")
        verify(folder, manifest)
        scored_info[column] = (folder, manifest)
    tables = []
    for k, shard in enumerate(info["shards"]):  # shard by shard
        table = read_shard(rollouts, shard, ["problem_id", "prompt_ids", "completion_ids"])
        for column, (folder, manifest) in scored_info.items():
            table = table.append_column(column, read_shard(folder, manifest["shards"][k], ["logps"]).column("logps"))
        tables.append(table)
    return _dataset(pa.concat_tables(tables))
