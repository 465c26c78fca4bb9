"""vLLM backend (optional extra `vllm`, GPU only): engines for evaluation, offline sampling and scoring.

Two ways an engine is used, and the rule between them:
  own process   evaluations (base, final), offline rollouts and teacher samples start an engine in a child
                process (`run_engine`), one per rank, and wait for it to end: when the next stage loads the HF
                teacher, the engine's GPU memory has really been returned (a process that ended holds none).
  trainer's     a trainer that generates with vLLM in colocate mode holds an engine in this process (TRL's
                `VLLMGeneration`). While it is alive, an evaluation of a model that engine can run (the 25/50/75%
                curve points, or the final evaluation) reuses it: the saved checkpoint's weights are loaded into
                it, it is woken and put back to sleep when sleep mode is on, and no second engine ever starts
                beside the trainer. An engine is found by `held_engine()` (registered with `register()`, or found
                among the live objects).
vLLM is never imported in this process except through the trainer's engine: without the extra, a call is a
one-line UserError. This module does not import `opd_bench.generation` (which calls into it): it works on token
ids and returns (text, token ids) pairs.

Model names: a local folder is passed as its absolute path, anything else (a hub id such as `Qwen/Qwen3-8B`)
unchanged.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import warnings
import weakref
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from opd_bench.errors import UserError

INSTALL_HINT = "the vLLM backend needs the extra: pip install 'opd-bench[vllm]' (GPU only)"

# torchrun / accelerate variables that would make a child's engine join the training job's process group.
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


def available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    """A UserError saying how to install vLLM when it is missing (it is not imported here)."""
    if not available():
        raise UserError(INSTALL_HINT)


def model_name(model: str | Path) -> str:
    """What vLLM is given: an existing local folder (or file) as an absolute path, anything else unchanged."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


@dataclass(frozen=True)
class EngineSettings:
    """An engine outside training: the `vllm` config section's eval_* keys and max_model_len."""

    tensor_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    enforce_eager: bool = False
    dtype: str = "auto"
    seed: int = 0

    @classmethod
    def of(cls, vllm_cfg=None, seed: int = 0) -> "EngineSettings":
        """From a config's `vllm` section (None: the defaults)."""
        if vllm_cfg is None:
            return replace(_configured, seed=seed)
        if isinstance(vllm_cfg, EngineSettings):
            return replace(vllm_cfg, seed=seed)
        return cls(tensor_parallel=vllm_cfg.eval_tensor_parallel,
                   gpu_memory_utilization=vllm_cfg.eval_gpu_memory_utilization, max_model_len=vllm_cfg.max_model_len,
                   enforce_eager=vllm_cfg.enforce_eager, seed=seed)

    def llm_kwargs(self, model: str | Path) -> dict:
        """Keyword arguments of `vllm.LLM` (max_model_len, an EngineArgs field, only when set)."""
        kwargs = {"model": model_name(model), "tensor_parallel_size": self.tensor_parallel, "dtype": self.dtype,
                  "seed": self.seed, "gpu_memory_utilization": self.gpu_memory_utilization,
                  "enforce_eager": self.enforce_eager}
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs


_configured = EngineSettings()


def configure(vllm_cfg) -> None:
    """Process-wide default settings for calls that are not given any (e.g. an evaluation called without them)."""
    global _configured
    _configured = EngineSettings.of(vllm_cfg)


@dataclass(frozen=True)
class Sampling:
    """What one request asks for (opd_bench.generation.SamplingParams, minus the seed: each prompt has its own)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128


def prompt_seeds(seed: int, indices) -> list[int]:
    """One seed per prompt, from its index in the whole prompt list: the same samples however prompts are split
    over ranks or engines (vLLM seeds each request's generator with its own seed)."""
    return [(seed * 1_000_003 + int(i)) % (2**31 - 1) for i in indices]


# ----------------------------------------------------------------------------- requests on an engine


def _sampling_params(vllm, s: Sampling, seed: int, max_tokens: int | None = None):
    greedy = s.temperature == 0
    return vllm.SamplingParams(
        n=1 if greedy else s.n,  # greedy samples are identical: one, repeated (some versions reject n > 1)
        temperature=s.temperature, top_p=1.0 if greedy else s.top_p,
        max_tokens=s.max_tokens if max_tokens is None else max_tokens, seed=seed, skip_special_tokens=True)


def generate_ids(llm, prompt_ids: list[list[int]], sampling: Sampling, seeds: list[int],
                 max_model_len: int | None = None) -> tuple[list[list[tuple[str, list[int]]]], int]:
    """n (text, completion ids) per prompt, and how many requests had max_tokens clamped to fit max_model_len."""
    import vllm
    from vllm.inputs import TokensPrompt

    params, clamped = [], 0
    for ids, seed in zip(prompt_ids, seeds):
        limit = sampling.max_tokens
        if max_model_len is not None and len(ids) + limit > max_model_len:
            limit, clamped = max(1, max_model_len - len(ids)), clamped + 1
        params.append(_sampling_params(vllm, sampling, seed, limit))
    requests = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
    outputs = llm.generate(requests, params, use_tqdm=False)
    results = []
    for output in outputs:
        samples = [(o.text, list(o.token_ids)) for o in output.outputs]
        results.append(samples * sampling.n if sampling.temperature == 0 else samples)
    return results, clamped


def score_ids(llm, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
    """log p(y_t | x, y_<t) of each given completion token, from `prompt_logprobs` (one forward per sequence:
    the completion is appended to the prompt; one new token is generated and discarded)."""
    import vllm
    from vllm.inputs import TokensPrompt

    sampling = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    requests = [TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in zip(prompt_ids, completion_ids)]
    outputs = llm.generate(requests, sampling, use_tqdm=False)
    return [[output.prompt_logprobs[len(p) + i][token].logprob for i, token in enumerate(c)]
            for output, p, c in zip(outputs, prompt_ids, completion_ids)]


# ----------------------------------------------------------------------------- engines in a child process


@dataclass
class WorkItem:
    """One batch of requests for `run_engine`: generation (sampling set) or scoring (completion_ids set)."""

    key: int
    prompt_ids: list[list[int]]
    seeds: list[int] | None = None
    sampling: Sampling | None = None
    completion_ids: list[list[int]] | None = None
    meta: dict | None = None  # passed through to on_result


def _child_env(devices: list[str] | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


def _child_init(env: dict) -> None:
    os.environ.clear()
    os.environ.update(env)


def _child_main(kwargs: dict, items: list[WorkItem], on_result: Callable | None):
    """Runs in the child: build the engine, run every item, hand each result to on_result (or return them)."""
    import vllm

    llm = vllm.LLM(**kwargs)
    results = []
    for item in items:
        if item.completion_ids is not None:
            out = score_ids(llm, item.prompt_ids, item.completion_ids)
        else:
            out, _ = generate_ids(llm, item.prompt_ids, item.sampling, item.seeds, kwargs.get("max_model_len"))
        if on_result is not None:
            on_result(item, out)
        else:
            results.append(out)
    return results


def engine_devices(rank: int, tensor_parallel: int) -> list[str] | None:
    """The GPUs rank `rank`'s child engine sees: its own (LOCAL_RANK) and the next tp - 1. None: unchanged (a single
    process sees every GPU it was given)."""
    local = int(os.environ.get("LOCAL_RANK", rank))
    if "LOCAL_RANK" not in os.environ and "RANK" not in os.environ:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [d for d in visible.split(",") if d.strip()]
    else:
        try:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
        except ImportError:
            ids = []
    chosen = ids[local: local + tensor_parallel]
    return chosen or None


def run_engine(model: str | Path, settings: EngineSettings, items: list[WorkItem], *,
               on_result: Callable | None = None, rank: int = 0) -> list:
    """Start an engine for `model` in a child process, run the items in order, end the process, return the results
    (or hand each to `on_result(item, result)` inside the child, e.g. to write a shard as soon as it is done).
    The child sees only this rank's GPUs and none of the launcher's process-group variables."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    require_vllm()
    env = _child_env(engine_devices(rank, settings.tensor_parallel))
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_child_init, initargs=(env,)) as pool:
        try:
            return pool.submit(_child_main, settings.llm_kwargs(model), items, on_result).result()
        except BrokenProcessPool:
            raise RuntimeError(f"the vLLM engine process for {model} died (out of memory or killed); "
                               f"see its log above") from None


# ----------------------------------------------------------------------------- the trainer's engine

_registered: "weakref.WeakSet" = weakref.WeakSet()


def register(generation) -> None:
    """Name the engine a trainer holds (TRL's VLLMGeneration, colocate mode) so that evaluations reuse it."""
    _registered.add(generation)


def held_engine():
    """TRL's colocated engine held in this process (a live VLLMGeneration with an LLM), or None."""
    for generation in list(_registered):
        if getattr(generation, "llm", None) is not None:
            return generation
    module = sys.modules.get("trl.generation.vllm_generation")
    if module is None:  # TRL's vLLM glue was never imported: no trainer engine can exist
        return None
    cls = getattr(module, "VLLMGeneration", None)
    with warnings.catch_warnings():  # isinstance on some live objects (deprecated torch proxies) warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, cls) and getattr(obj, "mode", None) == "colocate" and getattr(obj, "llm", None):
                    return obj
            except Exception:  # noqa: BLE001 - a proxy that fails isinstance is not an engine
                continue
    return None


SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size")


def can_run(llm, model: str | Path) -> bool:
    """Whether the engine's model has `model`'s architecture and shapes (so its weights can be loaded into it)."""
    from transformers import AutoConfig

    try:
        ours = AutoConfig.from_pretrained(str(model)).get_text_config()
    except OSError:
        return False
    theirs = llm.llm_engine.model_config.hf_config
    theirs = theirs.get_text_config() if hasattr(theirs, "get_text_config") else theirs
    return all(getattr(ours, k, None) == getattr(theirs, k, None) for k in SHAPE_KEYS)


def _checkpoint_tensors(model: str | Path):
    from safetensors import safe_open

    files = sorted(Path(model).glob("*.safetensors"))
    if not files:
        raise UserError(f"{model} has no safetensors weights to load into the trainer's vLLM engine")
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_weights(llm, model: str | Path) -> None:
    """Load a saved checkpoint's weights into a colocated engine (TRL's sync path: the driver worker's model)."""
    runner_model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    runner_model.load_weights(_checkpoint_tensors(model))
    llm.reset_prefix_cache()


def generate_on_held(generation, model: str | Path, prompt_ids: list[list[int]], sampling: Sampling,
                     seeds: list[int]) -> tuple[list, dict]:
    """Generate with the trainer's engine, on `model`'s weights (a checkpoint the trainer just saved). Sleep mode:
    the engine is woken for this and put back to sleep (level 2, TRL's), marked so the trainer re-pushes its
    weights before its next generation. Requests longer than the engine's max_model_len have max_tokens clamped
    (counted in the returned info)."""
    llm = generation.llm
    sleeping = bool(getattr(generation, "enable_sleep_mode", False))
    if sleeping:
        llm.wake_up()
        generation._llm_weights_sleeping = False
    try:
        load_weights(llm, model)
        max_len = llm.llm_engine.model_config.max_model_len
        results, clamped = generate_ids(llm, prompt_ids, sampling, seeds, max_len)
    finally:
        if sleeping:
            llm.sleep(level=2)
            generation._llm_weights_sleeping = True
    return results, {"engine": "trainer's colocated vLLM engine", "max_model_len": max_len, "clamped": clamped}


def shutdown_held() -> bool:
    """Drop the trainer's engine once training is over (True when there was one): the caller must hold no other
    reference (the trainer). Its memory is returned to the allocator; later stages use child processes."""
    generation = held_engine()
    if generation is None:
        return False
    _registered.discard(generation)
    generation.llm = None
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return True


# ----------------------------------------------------------------------------- entry points


def generate(model: str | Path, prompt_ids: list[list[int]], sampling: Sampling, seeds: list[int], *,
             settings: EngineSettings | None = None, rank: int = 0) -> tuple[list, dict]:
    """n (text, completion ids) per prompt, and where they came from: the trainer's engine when one is held and
    can run `model`, else an engine in a child process that has ended when this returns."""
    generation = held_engine()
    if generation is not None and can_run(generation.llm, model):
        return generate_on_held(generation, model, prompt_ids, sampling, seeds)
    settings = settings or EngineSettings.of(None)
    (results,) = run_engine(model, settings, [WorkItem(0, prompt_ids, seeds, sampling)], rank=rank)
    return results, {"engine": "own process", **{k: v for k, v in asdict(settings).items() if k != "seed"}}


def teacher_logprobs_vllm(model: str | Path, prompt_ids: list[list[int]], completion_ids: list[list[int]], *,
                          settings: EngineSettings | None = None, rank: int = 0) -> list[list[float]]:
    """Sampled-token log-probs of given completions under `model` (raw model log-probs, no temperature), from an
    engine in a child process."""
    (logps,) = run_engine(model, settings or EngineSettings.of(None),
                          [WorkItem(0, prompt_ids, completion_ids=completion_ids)], rank=rank)
    return logps
