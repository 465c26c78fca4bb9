"""Our tasks run through lm-eval with the same samples and scores as through our harness, and a tiny
model runs end to end through `opd-bench eval` on real tasks.

A 1-layer random Qwen3 with the char tokenizer is enough: greedy decoding makes both harnesses
produce the same completions, so their per-sample texts and their scores must match exactly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from opd_bench.lm_eval_export import export_tasks, process_results
from opd_bench.registry import TASKS

K, DOCS, TOKENS = 2, 2, 16


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from opd_bench.micro.models import new_model
    from opd_bench.micro.tokenizer import build_char_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_char_tokenizer()
    # max_positions covers a HumanEval prompt: lm-eval would otherwise truncate it and we would not.
    model = new_model(tokenizer, seed=0, layers=1, hidden=16, heads=2, intermediate=32, max_positions=2048)
    scramble(model)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def scramble(model, std: float = 1.0) -> None:
    """Large random weights. At the default init the tied embeddings make a 1-layer model repeat
    the last prompt token (a special token: empty text); these weights give varied characters."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def test_export_writes_loadable_lm_eval_tasks(tmp_path):
    paths = export_tasks(tmp_path, ["aime24", "humaneval"])
    assert [p.name for p in paths] == ["opd-aime24.yaml", "opd-humaneval.yaml"]
    config = yaml.load(paths[1].read_text(), Loader=_IgnoreTags)
    assert config["custom_dataset"] == "!function utils.load_docs"
    card = TASKS.get("humaneval")
    assert config["repeats"] == card.k
    assert config["filter_list"][0]["filter"] == [{"function": "take_first_k", "k": card.k}]
    assert config["generation_kwargs"] == {"until": [], "do_sample": True, "max_gen_toks": card.max_new_tokens,
                                           "temperature": 0.6, "top_p": 0.95, "top_k": 0}
    assert config["unsafe_code"] is True and config["metadata"] == {"version": card.version, "opd_task": "humaneval"}
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert {"opd-aime24", "opd-humaneval"} <= set(manager.all_tasks)


class _IgnoreTags(yaml.SafeLoader):
    pass


_IgnoreTags.add_constructor("!function", lambda loader, node: f"!function {node.value}")


def test_process_results_uses_our_scorers():
    problem = TASKS.get("humaneval").load_problems()[0]
    doc = {"answer": problem.answer, "scorer": "humaneval"}
    assert process_results(doc, [[problem.solutions["canonical"], ""]]) == {"avg_at_k": 0.5, "pass_at_k": 1.0}
    math_doc = {"answer": "204", "scorer": "math"}
    assert process_results(math_doc, [["\\boxed{204}", "\\boxed{204}"]]) == {"avg_at_k": 1.0, "pass_at_k": 1.0}


@pytest.mark.parametrize("name", ["aime24", "humaneval"])
def test_lm_eval_and_our_harness_agree_sample_by_sample(name, tiny_model, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from opd_bench.evaluation import evaluate

    greedy = {"temperature": 0.0, "k": K, "max_new_tokens": TOKENS}
    export_tasks(tmp_path / "tasks", [name], **greedy)
    out = simple_evaluate(
        model=HFLM(pretrained=str(tiny_model), device="cpu", batch_size=DOCS * K),
        tasks=[f"opd-{name}"], limit=DOCS, apply_chat_template=True, confirm_run_unsafe_code=True,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        log_samples=True, bootstrap_iters=0,
    )
    theirs = {s["doc"]["id"]: s["filtered_resps"][0] for s in out["samples"][f"opd-{name}"]}

    card = TASKS.get(name).model_copy(update={"temperature": 0.0})
    metrics = evaluate(tiny_model, card, tmp_path / "ours", n_per_split=DOCS, k=K, max_new_tokens=TOKENS,
                       batch_size=DOCS * K)
    ours: dict[str, list[str]] = {}
    for line in (tmp_path / "ours" / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        ours.setdefault(record["problem_id"], []).append(record["completion"])

    assert ours == theirs and len(ours) == DOCS and all(len(v) == K for v in ours.values())
    assert any(text for texts in ours.values() for text in texts)  # the model did generate
    result = out["results"][f"opd-{name}"]
    assert result["avg_at_k,all-samples"] == metrics["avg@k"]
    assert result["pass_at_k,all-samples"] == metrics["pass@k"]


# ----------------------------------------------------------------------------- the CLI


def test_cli_eval_runs_real_tasks_end_to_end(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from opd_bench.cli import app

    result = CliRunner().invoke(app, [
        "eval", "--model", str(tiny_model), "--task", "aime24", "--task", "humaneval", "--k", str(K),
        "--n-per-split", str(DOCS), "--max-new-tokens", "8", "--out", str(tmp_path), "--set", "eval.workers=1"])
    assert result.exit_code == 0, result.output
    for name in ("aime24", "humaneval"):
        records = [json.loads(line) for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        assert len(records) == DOCS * K
        assert {"problem_id", "sample", "completion", "correct", "detail"} <= set(records[0])
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["protocol"]["max_new_tokens"] == 8 and metrics["k"] == K


# The vLLM glue (a fake `vllm` module in child processes): tests/test_vllm_glue.py.


def test_vllm_backend_without_vllm_is_a_one_line_error(monkeypatch, capsys, tiny_model):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed")
    from opd_bench import cli

    monkeypatch.setattr(sys, "argv", ["opd-bench", "eval", "--model", str(tiny_model), "--task", "aime24",
                                      "--backend", "vllm"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: the vLLM backend needs the extra: pip install 'opd-bench[vllm]' (GPU only)"
