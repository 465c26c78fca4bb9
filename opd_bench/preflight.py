"""Checks `opd-bench run` makes before any work, so bad input costs seconds, not a training run: each
failure is a UserError (one line naming the fix, exit code 2) raised before anything is written."""

from __future__ import annotations

import tempfile
from pathlib import Path

from opd_bench.errors import UserError


def check_outputs(cfg) -> None:
    """The run folder and the leaderboard must be writable, and the leaderboard must be ours."""
    from opd_bench.leaderboard import read_rows

    board = Path(cfg.leaderboard)
    for key, folder in (("runs_dir", Path(cfg.runs_dir)), ("leaderboard", board.parent)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".opd-bench-write-test-"):
                pass
        except OSError as exc:
            why = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
            raise UserError(f"cannot write to {folder} ({why or exc}); --set {key}=... a writable location") from None
    if board.is_dir():
        raise UserError(f"leaderboard {board} is a folder; --set leaderboard=... a CSV file path")
    read_rows(board)  # a CSV with another header is refused now, not after training


def check_tasks(cfg) -> None:
    from opd_bench.registry import TASKS

    for name in cfg.eval.tasks:
        TASKS.get(name)  # unknown: did-you-mean


def _is_local(name: str) -> bool:
    """A filesystem path rather than a Hugging Face id ('org/name' or 'name')."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_model_paths(cfg, reference: str | None = None) -> None:
    """Local model folders named by a paper preset (or --set), and a method's reference model, must exist."""
    from opd_bench.methods.base import PI_SFT

    named = {f"world.hf.{k}": getattr(cfg.world.hf, k) for k in ("sft_student", "teacher", "teacher_b", "tokenizer")}
    if cfg.world.kind != "hf":
        named = {}
    if reference not in (None, PI_SFT):
        named["method.params.reference"] = reference
    for key, value in named.items():
        if value and _is_local(value) and not Path(value).expanduser().is_dir():
            raise UserError(f"{key}: no model folder {value}; fix the path (or give a Hugging Face id)")


def load_checked_tokenizer(path: str):
    """The run's tokenizer; prompts are chat messages and completions must end, so both are required."""
    from opd_bench.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer {path!r}: {str(exc).splitlines()[0]}; fix world.hf.tokenizer "
                        f"(or world.hf.sft_student)") from None
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer {path} has no chat template (prompts are chat messages); use an "
                        f"instruct/chat tokenizer or set tokenizer.chat_template and save_pretrained it")
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer {path} has no EOS token (completions could never end); set eos_token "
                        f"in its tokenizer_config.json")
    return tokenizer


def check_vocabularies(tokenizer, student: str, models: tuple) -> None:
    """Student, teacher(s) and reference must share one vocabulary (offline.check_tokenizers)."""
    from opd_bench.offline import check_tokenizers

    try:
        check_tokenizers(tokenizer, student, models)
    except OSError as exc:
        raise UserError(f"cannot read a model's config: {str(exc).splitlines()[0]}; check the world.hf.* "
                        f"paths and ids") from None
