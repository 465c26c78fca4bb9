"""The cost ledger: every stage's device-seconds, estimated FLOPs (by kind), modeled GPU-seconds and tokens.

device-seconds = wall seconds x devices in use (a CPU process with one torch thread is one device): measured.
FLOPs are estimated the standard way, with N the parameter count of the model doing the work, and kept by kind:
  decode   2*N per token generated (autoregressive sampling: memory-bound on GPUs)
  prefill  2*N per token scored (a forward pass over known tokens: teacher / reference / sampler log-probs)
  train    6*N per token trained (forward + backward)
`flops` is their total (what callers and rows have always read).
modeled_seconds = what the stage would cost on GPUs under `PRICE` (see `GpuPrice` and docs/budget.md): a function of
the FLOPs alone, so of the (seeded) tokens alone, whatever the machine's load.
The ledger is a JSON list in the run (or stage) folder, rewritten atomically after every stage.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# ----------------------------------------------------------------------------- the price model

# Peak dense BF16 tensor throughput of one H100 SXM (NVIDIA's datasheet lists 1,979 TFLOPS "with sparsity"; dense is
# half): the number fms-fsdp and nanoGPT divide by for H100 MFU.
H100_BF16_PEAK_FLOPS = 989e12

# Training and prefill: large GEMMs, compute-bound. 0.40 is a typical achieved MFU on H100: Llama 3 pre-training
# reports 38-43% BF16 MFU on H100s ("The Llama 3 Herd of Models", 2024, Table 4); fms-fsdp reports 46% for a 7B.
MFU_PREFILL = 0.40

# Decode runs at a lower FLOP efficiency than prefill on the same model and GPUs. The ratio is measured by the SGLang
# team ("Deploying DeepSeek with PD Disaggregation and Large-scale Expert Parallelism on 96 H100 GPUs", LMSYS blog,
# 2025-05-05, Evaluation): DeepSeek-V3 on 8xH100 nodes, 2K-token sequences, prefill 54,543 input tokens/s per node
# and decode 22,282 output tokens/s per node. Both phases cost the same 2*N(active) FLOPs per token, so the ratio of
# token rates is the ratio of FLOP efficiencies: 22,282 / 54,543 = 0.409 (DeepSeek's own production figures in the
# same blog, 14,800 decode vs 32,206 uncached prefill tokens/s per H800 node, give 0.46).
DECODE_EFFICIENCY_RATIO = 22_282 / 54_543
MFU_DECODE = MFU_PREFILL * DECODE_EFFICIENCY_RATIO


@dataclass(frozen=True)
class GpuPrice:
    """seconds = (train + prefill FLOPs) / (peak * mfu_prefill) + decode FLOPs / (peak * mfu_decode).
    The seconds are GPU-seconds (device-seconds): FLOPs are totals, so the device count does not enter."""

    name: str
    peak_flops: float
    mfu_prefill: float
    mfu_decode: float

    def seconds(self, flops: float, decode_flops: float = 0.0) -> float:
        """`flops` is the total; its non-decode part (train, prefill, and anything not classified) is priced at
        the prefill efficiency."""
        return (flops - decode_flops) / (self.peak_flops * self.mfu_prefill) \
            + decode_flops / (self.peak_flops * self.mfu_decode)


PRICE = GpuPrice(name="H100-SXM bf16", peak_flops=H100_BF16_PEAK_FLOPS, mfu_prefill=MFU_PREFILL, mfu_decode=MFU_DECODE)


def modeled_seconds(cost: "StageCost | dict | float", price: GpuPrice = PRICE) -> float:
    """Modeled GPU-seconds of a StageCost, of a dict with `flops` (and `decode_flops`), or of a bare FLOP count
    (all priced at the prefill efficiency: a bare number says nothing about decode)."""
    if isinstance(cost, StageCost):
        return price.seconds(cost.flops, cost.decode_flops)
    if isinstance(cost, dict):
        return price.seconds(float(cost.get("flops", 0.0)), float(cost.get("decode_flops", 0.0)))
    return price.seconds(float(cost))


# ----------------------------------------------------------------------------- stages


@dataclass
class StageCost:
    stage: str
    devices: int = 1
    wall_seconds: float = 0.0
    tokens_trained: int = 0
    tokens_generated: int = 0
    tokens_scored: int = 0
    flops: float = 0.0  # the total: decode + prefill + train (+ anything a caller set directly)
    cached: bool = False  # reused from the artifact cache: paid when it was built, not now
    extra: dict = field(default_factory=dict)
    decode_flops: float = 0.0
    prefill_flops: float = 0.0
    train_flops: float = 0.0

    @property
    def device_seconds(self) -> float:
        return self.wall_seconds * self.devices

    @property
    def modeled_seconds(self) -> float:
        return modeled_seconds(self)

    def train(self, n_params: int, tokens: int) -> None:
        self.tokens_trained += tokens
        self.train_flops += 6.0 * n_params * tokens
        self.flops += 6.0 * n_params * tokens

    def generate(self, n_params: int, tokens: int) -> None:
        self.tokens_generated += tokens
        self.decode_flops += 2.0 * n_params * tokens
        self.flops += 2.0 * n_params * tokens

    def score(self, n_params: int, tokens: int) -> None:
        self.tokens_scored += tokens
        self.prefill_flops += 2.0 * n_params * tokens
        self.flops += 2.0 * n_params * tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "device_seconds": self.device_seconds, "modeled_seconds": self.modeled_seconds}

    @classmethod
    def from_dict(cls, data: dict) -> "StageCost":
        names = {f.name for f in fields(cls)}
        cost = cls(**{k: v for k, v in data.items() if k in names})
        if not any(k in data for k in ("decode_flops", "prefill_flops", "train_flops")):
            _classify_legacy(cost)
        return cost


def _classify_legacy(cost: StageCost) -> None:
    """A record written before FLOPs were kept by kind: a stage that did one kind of work (offline rollouts,
    teacher log-probs, SFT) gets all its FLOPs of that kind; a mixed one stays unclassified (priced as prefill)."""
    kinds = {"decode_flops": cost.tokens_generated, "prefill_flops": cost.tokens_scored, "train_flops": cost.tokens_trained}
    done = [k for k, tokens in kinds.items() if tokens]
    if len(done) == 1:
        setattr(cost, done[0], cost.flops)


class Ledger:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.stages: list[StageCost] = []
        if self.path.exists():
            self.stages = [StageCost.from_dict(d) for d in json.loads(self.path.read_text())]

    @contextmanager
    def stage(self, name: str, devices: int = 1):
        """Time a stage; the caller adds tokens/FLOPs to the yielded record."""
        cost = StageCost(stage=name, devices=devices)
        start = time.perf_counter()
        try:
            yield cost
        finally:
            cost.wall_seconds = time.perf_counter() - start
            self.add(cost)

    def add(self, cost: StageCost) -> None:
        self.stages.append(cost)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps([s.to_dict() for s in self.stages], indent=1))
        os.replace(tmp, self.path)

    def total(self, include_cached: bool = False) -> dict:
        return totals([s for s in self.stages if include_cached or not s.cached])


def totals(stages: list[StageCost]) -> dict:
    """Sums over stages: measured device-seconds, modeled GPU-seconds, FLOPs (total and by kind), tokens."""
    keys = ("flops", "decode_flops", "prefill_flops", "train_flops", "tokens_trained", "tokens_generated", "tokens_scored")
    return {"device_seconds": sum(s.device_seconds for s in stages),
            "modeled_seconds": sum(s.modeled_seconds for s in stages),
            **{k: sum(getattr(s, k) for s in stages) for k in keys}}
