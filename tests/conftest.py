"""Shared test set-up: one torch thread, no hub access, quiet progress bars."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OPD_BENCH_QUIET", "1")

import pytest


@pytest.fixture(scope="session")
def smoke_world(tmp_path_factory):
    """The micro pipeline at toy size (seconds), built once per test session in a temp folder."""
    from opd_bench.config import load_config
    from opd_bench.micro.world import prepare

    root = tmp_path_factory.mktemp("smoke-artifacts")
    cfg = load_config("smoke", [f"artifacts_dir={root}"])
    return cfg, prepare(cfg)


@pytest.fixture(scope="session")
def tiny_model():
    """make(path, seed, max_positions=512): a 1-layer random micro model and its tokenizer, saved in `path`."""
    def make(path, seed: int, max_positions: int = 512):
        from opd_bench.micro.models import new_model
        from opd_bench.micro.tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer()
        new_model(tokenizer, seed=seed, layers=1, hidden=16, heads=2, intermediate=32, max_positions=max_positions
                  ).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path
    return make
