"""The offline precompute at scale (offline.py): parquet shards with a manifest and checksums, scored chunked,
resumable shard by shard.

* A build SIGKILLed after shard k (`OPD_BENCH_KILL_AT=<stage>:shard-k`, resume.crash_point) resumes at shard
  k + 1 (the shards before it are kept, not redone) and ends with the same data, byte for byte, as a build that
  was never interrupted; the resumed stage's cost counts the attempt before the crash.
* The teacher scores chunked (`completion_logps(..., chunked=True)`), and a damaged shard is refused.
(Sharding over 2 ranks: tests/test_vllm_glue.py. Peak memory of chunked vs dense: benchmarks/precompute_memory.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KILLED = -9
SCRIPT = r'''
import sys


def main():  # under a __main__ guard (a child process may import this file again)
    from opd_bench import offline
    from opd_bench.config import load_config
    student, teacher, artifacts = sys.argv[1:4]
    cfg = load_config("smoke", [f"artifacts_dir={artifacts}", "eval.workers=1", "train.rollouts_per_prompt=2",
                                "train.max_new_tokens=6"])
    rollouts, _ = offline.build_rollouts(cfg, student, student, [(f"p{i}", f"{i}+{i}=") for i in range(10)],
                                         shard_rows=4)
    offline.build_logps(cfg, rollouts, teacher)


if __name__ == "__main__":
    main()
'''


def _build(script: Path, student: Path, teacher: Path, artifacts: Path, kill_at: str | None = None):
    env = {k: v for k, v in os.environ.items() if k != "OPD_BENCH_KILL_AT"}
    if kill_at:
        env["OPD_BENCH_KILL_AT"] = kill_at
    proc = subprocess.run([sys.executable, str(script), str(student), str(teacher), str(artifacts)], env=env,
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _stage(artifacts: Path, name: str, partial: bool = False) -> Path:
    (folder,) = [p for p in artifacts.iterdir() if p.name.startswith((".tmp-" if partial else "") + name + "-")]
    return folder


def _pids(stage: Path) -> list[int]:
    return [json.loads(p.read_text())["pid"] for p in sorted((stage / "data").glob("shard-*.json"))]


@pytest.mark.slow
def test_a_crash_after_shard_k_resumes_at_shard_k_plus_1_with_identical_data(tmp_path, monkeypatch, tiny_model):
    from opd_bench import logprobs, offline
    from opd_bench.cache import read_manifest
    from opd_bench.errors import UserError

    student, teacher = tiny_model(tmp_path / "student", 0, 256), tiny_model(tmp_path / "teacher", 1, 256)
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)

    # The reference: built in one go, here (the teacher scores chunked).
    calls = []
    real = logprobs.completion_logps
    monkeypatch.setattr(logprobs, "completion_logps", lambda *a, **k: calls.append(k.get("chunked")) or real(*a, **k))
    from opd_bench.config import load_config

    ref = tmp_path / "ref"
    cfg = load_config("smoke", [f"artifacts_dir={ref}", "eval.workers=1", "train.rollouts_per_prompt=2",
                                "train.max_new_tokens=6"])
    rollouts, _ = offline.build_rollouts(cfg, student, student, [(f"p{i}", f"{i}+{i}=") for i in range(10)],
                                         shard_rows=4)
    scored, _ = offline.build_logps(cfg, rollouts, teacher)
    assert calls and set(calls) == {True}
    assert len(read_manifest(rollouts)["info"]["shards"]) == 5  # 20 rows, 4 per shard

    # 1. killed after rollouts shard 1: shards 0 and 1 are kept in the stage's partial folder, nothing looks built
    art = tmp_path / "crashed"
    code, err = _build(script, student, teacher, art, kill_at="rollouts:shard-1")
    assert code == KILLED, err[-2000:]
    partial = _stage(art, "rollouts", partial=True)
    assert sorted(offline.done_shards(partial / "data")) == [0, 1]
    assert not [p for p in art.iterdir() if p.name.startswith("rollouts-")]
    first = _pids(partial)

    # 2. resumed: rollouts go on at shard 2; killed after teacher-logps shard 2
    code, err = _build(script, student, teacher, art, kill_at="teacher-logps:shard-2")
    assert code == KILLED, err[-2000:]
    built = _stage(art, "rollouts")
    pids = _pids(built)
    assert pids[:2] == first and len(set(pids[2:])) == 1 and pids[2] not in first  # shards 0-1 not redone
    assert sorted(offline.done_shards(_stage(art, "teacher-logps", partial=True) / "data")) == [0, 1, 2]

    # 3. resumed again: teacher-logps go on at shard 3 and finish
    code, err = _build(script, student, teacher, art)
    assert code == 0, err[-2000:]
    scored_art = _stage(art, "teacher-logps")
    pids = _pids(scored_art)
    assert len(set(pids[:3])) == 1 and len(set(pids[3:])) == 1 and pids[3] != pids[0]
    assert not [p for p in art.iterdir() if p.name.startswith(".tmp-")]  # the partial folders became the stages

    # Identical data: the same cache keys, shards, checksums and training dataset.
    for a, b in ((rollouts, built), (scored, scored_art)):
        assert a.name == b.name
        info_a, info_b = read_manifest(a)["info"], read_manifest(b)["info"]
        assert info_a["shards"] == info_b["shards"] and info_a["checksum"] == info_b["checksum"]
    assert offline.load_offline(built, {"teacher_logps": scored_art}).to_dict() == \
        offline.load_offline(rollouts, {"teacher_logps": scored}).to_dict()
    # The cost of the resumed stages counts both attempts.
    for stage in (built, scored_art):
        cost = read_manifest(stage)["cost"]
        assert cost["extra"]["attempts"] == 2 and cost["wall_seconds"] > 0

    # A damaged shard is refused, with the fix.
    shard = scored_art / "data" / "shard-00003.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch in shard-00003.parquet.*delete the folder"):
        offline.load_offline(built, {"teacher_logps": scored_art})
