"""Evaluate a saved model on a task card: generate k samples per problem, score, aggregate.

Writes `samples.jsonl` (one record per sample: prompt, completion, extracted answer, verdict) and
`metrics.json` (avg@k, unbiased pass@k, per split, with the card's version and protocol) into the
output folder, and returns the metrics.

backend "vllm": the samples come from the trainer's colocated engine when one is held in this process and can run
the model (the 25/50/75% curve evaluations: no second engine beside the trainer), else from an engine in a child
process that has ended (memory returned) when `evaluate` returns; `metrics["engine"]` says which, with the count of
requests clamped to the engine's max_model_len. `vllm`: the config's `vllm` section (None: the defaults).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from opd_bench.generation import SamplingParams, generate
from opd_bench.metrics import aggregate
from opd_bench.scoring import SCORERS
from opd_bench.tasks import TaskCard


def evaluate(model_dir: str | Path, card: TaskCard, out_dir: str | Path, *, n_per_split: int | None = None,
             batch_size: int = 128, workers: int = 1, seed: int = 0, k: int | None = None,
             max_new_tokens: int | None = None, temperature: float | None = None, backend: str = "hf",
             vllm=None, greedy: bool = True) -> dict:
    """`greedy`: when the card asks for it (greedy_beside), also the greedy accuracy, as metrics["greedy"]."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = card.load_problems(n_per_split)
    params = SamplingParams(n=k or card.k, temperature=card.temperature if temperature is None else temperature,
                            top_p=card.top_p,
                            max_new_tokens=max_new_tokens or card.max_new_tokens, seed=seed)
    prompts = [card.render_prompt(p) for p in problems]
    engine: dict = {}
    completions = generate(model_dir, prompts, params, batch_size=batch_size, workers=workers,
                           desc=f"eval {card.name}", backend=backend, vllm=vllm, info=engine)
    score = _scorer(card)
    jobs = [(p, prompt, i, c) for p, prompt, cs in zip(problems, prompts, completions) for i, c in enumerate(cs)]
    verdicts = score([(job[3].text, job[0].answer) for job in jobs])
    records = [{"problem_id": p.id, "split": p.split, "sample": i, "prompt": prompt, "completion": c.text,
                "extracted": v.extracted, "correct": v.correct, "detail": v.detail,
                "completion_tokens": len(c.token_ids)}
               for (p, prompt, i, c), v in zip(jobs, verdicts)]
    metrics = {"task": card.tag, "protocol": params_protocol(card, params), **aggregate(records),
               "generated_tokens": sum(r["completion_tokens"] for r in records)}
    if greedy and card.greedy_beside and params.temperature > 0:
        metrics["greedy"] = _greedy_accuracy(model_dir, card, problems, prompts, params, score, batch_size=batch_size,
                                             workers=workers, backend=backend, vllm=vllm)
    if backend == "vllm":
        metrics["engine"] = engine
    _write_jsonl(out_dir / "samples.jsonl", records)
    _write_json(out_dir / "metrics.json", metrics)
    return metrics


def _scorer(card: TaskCard):
    """verdicts(pairs of (completion, answer)), each distinct pair scored once: a verdict depends on nothing else, and
    a sampled evaluation repeats itself often (the same program k times, the greedy one among them), while a code
    verdict costs a sandboxed subprocess (tens of ms)."""
    scorer, seen = SCORERS[card.scorer], {}

    def verdicts(pairs: list[tuple[str, str]]) -> list:
        todo = list(dict.fromkeys(pair for pair in pairs if pair not in seen))
        # Code scoring waits on subprocesses, so threads overlap it; math scoring is fast either way.
        with ThreadPoolExecutor(max_workers=1 if card.scorer == "math" else 4) as pool:
            seen.update(zip(todo, pool.map(lambda pair: scorer(*pair), todo)))
        return [seen[pair] for pair in pairs]

    return verdicts


def _greedy_accuracy(model_dir, card: TaskCard, problems, prompts, params: SamplingParams, score, **gen) -> dict:
    """The share of problems the greedy completion solves, overall and per split (the same problems)."""
    greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=params.max_new_tokens, seed=params.seed)
    completions = generate(model_dir, prompts, greedy, desc=f"eval {card.name} (greedy)", **gen)
    correct = [v.correct for v in score([(c[0].text, p.answer) for p, c in zip(problems, completions)])]
    per_split: dict[str, list[bool]] = {}
    for p, ok in zip(problems, correct):
        per_split.setdefault(p.split, []).append(ok)
    return {"accuracy": sum(correct) / len(correct),
            "per_split": {s: sum(v) / len(v) for s, v in sorted(per_split.items())}}


def params_protocol(card: TaskCard, params: SamplingParams) -> dict:
    return {**card.protocol(), "k": params.n, "temperature": params.temperature, "max_new_tokens": params.max_new_tokens,
            "seed": params.seed}


def _write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
