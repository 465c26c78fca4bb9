"""A teacher on its own GPUs: log-probs from a vLLM OpenAI-compatible server (`vllm serve`, `trl vllm-serve`).

Online methods need log pT(y_t) of the student's sampled tokens. Instead of a 65 GB teacher inside every
training process, the run can point at a server that holds it (tensor parallel over its own GPUs) and ask
for prompt log-probs of prompt + completion, without generating:

  POST {base_url}/v1/completions
  {"model": M, "prompt": [[ids of prompt + completion], ...], "max_tokens": 1, "temperature": T,
   "prompt_logprobs": k}

`prompt` as lists of token ids is scored as given (no tokenization, no special tokens added). vLLM answers
one choice per prompt, in order, each with `prompt_logprobs`: one entry per prompt token, the first `null`
(nothing predicts it), then `{"<token id>": {"logprob": x, "rank": r, "decoded_token": s}, ...}` holding the
token actually there plus the k most likely (k = 0: only the actual token). This is the request TRL 1.16's
`VLLMClient.get_sequence_logprobs` sends; `max_tokens=1` because a completion request must generate at
least one token (the generated one is ignored).

Serve the teacher so that the numbers mean what the trainer expects:
  vllm serve Qwen/Qwen3-32B --tensor-parallel-size 4 --max-model-len 8192 \
      --logprobs-mode processed_logprobs --max-logprobs -1
`processed_logprobs` applies the request's temperature (vLLM's default, raw_logprobs, ignores it; at T = 1
both agree); `--max-logprobs -1` lifts the cap of 20 for top-k. `trl vllm-serve` sets both.

Top-k (`completion_topk`) is an approximation of the teacher's distribution: the mass outside the k most
likely tokens is missing. A run that uses it must say so in its row (`APPROXIMATION`).

Charging: the server's GPUs work for the run whether or not they are busy, so a run's device time is
  device_seconds = wall_seconds x (training devices + server devices)        (`device_seconds` below)
e.g. 10 h on 4 training GPUs with a teacher server on 4 GPUs is 80 device-hours, not 40.

A run points at a server with `--set train.teacher_server_url=http://HOST:PORT --set train.teacher_server_devices=N`
(training.py, trainer.OPDTrainer._score_on_server; docs/gpu.md section 5).

`LocalTeacherServer` is a stdlib `http.server` speaking the same format from an in-process HF model, for
tests and CPU smoke runs (no vLLM here): the round trip equals `completion_logps` to 1e-5.
"""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from opd_bench.errors import UserError

APPROXIMATION = "teacher distribution: top-{k} log-probs from a vLLM server (the tail's mass is missing)"


def charged_devices(training_devices: int, server_devices: int = 0) -> int:
    """Devices a run is charged for: its training processes' GPUs plus the teacher server's."""
    return int(training_devices) + int(server_devices)


def device_seconds(wall_seconds: float, training_devices: int, server_devices: int = 0) -> float:
    return float(wall_seconds) * charged_devices(training_devices, server_devices)


@dataclass
class TopK:
    """The teacher's k most likely next tokens at each completion position (an approximation: see APPROXIMATION)."""

    logps: torch.Tensor  # (B, C, k), by descending probability, -inf where padded
    ids: torch.Tensor  # (B, C, k), 0 where padded
    k: int
    approximate: bool = True

    @property
    def note(self) -> str:
        return APPROXIMATION.format(k=self.k)


def _rows(prompt_ids, prompt_mask, completion_ids, completion_mask) -> tuple[list[list[int]], list[int], list[int]]:
    """Each row's unpadded prompt + completion ids, its prompt length and completion length (prompts padded on
    the left, completions on the right, as TRL's batches; masks are 0/1)."""
    seqs, p_lens, c_lens = [], [], []
    for p_ids, p_m, c_ids, c_m in zip(prompt_ids.tolist(), prompt_mask.tolist(), completion_ids.tolist(),
                                      completion_mask.tolist()):
        prompt = [t for t, m in zip(p_ids, p_m) if m]
        completion = [t for t, m in zip(c_ids, c_m) if m]
        if not prompt:
            raise UserError("a row has an empty prompt: the teacher needs at least one token before the completion")
        seqs.append(prompt + completion)
        p_lens.append(len(prompt))
        c_lens.append(len(completion))
    return seqs, p_lens, c_lens


def _logprob(entry: dict, token: int) -> float:
    item = entry.get(str(token))
    if item is None:
        raise UserError(f"the teacher server's prompt log-probs lack the scored token {token}: is it vLLM's "
                        f"/v1/completions with prompt_logprobs?")
    value = item["logprob"] if isinstance(item, dict) else item
    return -math.inf if value is None or math.isnan(value) else float(value)


class TeacherServer:
    """Client of a vLLM OpenAI-compatible server holding the teacher."""

    def __init__(self, base_url: str, model: str | None = None, *, timeout: float = 600.0, chunk_size: int = 8,
                 max_concurrent: int = 4, retries: int = 2, devices: int = 0):
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self._model = model
        self.timeout, self.chunk_size, self.max_concurrent, self.retries = timeout, chunk_size, max_concurrent, retries
        self.devices = devices  # the server's GPUs, charged to the run's budget (device_seconds)

    # --- transport ---------------------------------------------------------------------------------

    def _request(self, path: str, payload: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="GET" if payload is None else "POST")
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as exc:  # the server answered: say what it said, do not retry
                body = exc.read().decode(errors="replace")[:300]
                raise UserError(f"teacher server {url} answered {exc.code}: {body}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                if attempt == self.retries:
                    reason = getattr(exc, "reason", exc)
                    raise UserError(f"cannot reach the teacher server at {self.base_url} ({reason}); start it "
                                    f"(docs/gpu.md: vllm serve ...) or fix the address") from None
                time.sleep(1.0 * (attempt + 1))
        raise AssertionError("unreachable")

    @property
    def model(self) -> str:
        """The served model's name (the first one the server lists, unless given)."""
        if self._model is None:
            models = self._request("/v1/models").get("data") or []
            if not models:
                raise UserError(f"the teacher server at {self.base_url} serves no model")
            self._model = models[0]["id"]
        return self._model

    def check(self) -> str:
        """Fail fast, before any training, when the server is not there; returns the model name."""
        return self.model

    # --- scoring -----------------------------------------------------------------------------------

    def _score_chunk(self, seqs: list[list[int]], k: int, temperature: float) -> list[list]:
        payload = {"model": self.model, "prompt": seqs, "max_tokens": 1, "temperature": temperature,
                   "prompt_logprobs": k}
        choices = self._request("/v1/completions", payload).get("choices") or []
        if len(choices) != len(seqs):
            raise UserError(f"the teacher server answered {len(choices)} choices for {len(seqs)} sequences")
        choices = sorted(choices, key=lambda c: c.get("index", 0))
        out = []
        for choice, seq in zip(choices, seqs):
            entries = choice.get("prompt_logprobs")
            if entries is None or len(entries) != len(seq):
                raise UserError("the teacher server returned no prompt_logprobs for every token: is it vLLM's "
                                "OpenAI-compatible server (vllm serve)?")
            out.append(entries)
        return out

    def sequence_logprobs(self, seqs: list[list[int]], k: int = 0, temperature: float = 1.0) -> list[list]:
        """The raw prompt_logprobs of each sequence, requested `chunk_size` sequences at a time in parallel."""
        if temperature <= 0:
            raise UserError(f"teacher scoring needs a positive temperature, got {temperature}")
        chunks = [seqs[i:i + self.chunk_size] for i in range(0, len(seqs), self.chunk_size)]
        if not chunks:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrent, len(chunks)))) as pool:
            parts = list(pool.map(lambda c: self._score_chunk(c, k, temperature), chunks))
        return [entries for part in parts for entries in part]

    @torch.no_grad()
    def completion_logps(self, prompt_ids, prompt_mask, completion_ids, completion_mask, *,
                         temperature: float = 1.0) -> torch.Tensor:
        """log pT(y_t) of the completion tokens: (B, C) float32, 0 at padding, aligned like
        opd_bench.logprobs.completion_logps (the in-process scorer)."""
        seqs, p_lens, c_lens = _rows(prompt_ids, prompt_mask, completion_ids, completion_mask)
        out = torch.zeros(completion_ids.shape, dtype=torch.float32)
        for row, (entries, seq, p, c) in enumerate(zip(self.sequence_logprobs(seqs, 0, temperature), seqs, p_lens,
                                                       c_lens)):
            if c:
                out[row, :c] = torch.tensor([_logprob(entries[p + j], seq[p + j]) for j in range(c)])
        return out.to(completion_ids.device)

    @torch.no_grad()
    def completion_topk(self, prompt_ids, prompt_mask, completion_ids, completion_mask, k: int, *,
                        temperature: float = 1.0) -> TopK:
        """The teacher's top-k next-token log-probs at each completion position (an approximation)."""
        return self.completion_scores(prompt_ids, prompt_mask, completion_ids, completion_mask, k=k,
                                      temperature=temperature)[1]

    @torch.no_grad()
    def completion_scores(self, prompt_ids, prompt_mask, completion_ids, completion_mask, *, k: int,
                          temperature: float = 1.0) -> tuple[torch.Tensor, TopK]:
        """Both from one request: log pT(y_t) of the completion tokens (as completion_logps) and the top-k."""
        if k < 1:
            raise UserError(f"top-k needs k >= 1, got {k}")
        seqs, p_lens, c_lens = _rows(prompt_ids, prompt_mask, completion_ids, completion_mask)
        shape = (*completion_ids.shape, k)
        sampled = torch.zeros(completion_ids.shape, dtype=torch.float32)
        logps, ids = torch.full(shape, -math.inf), torch.zeros(shape, dtype=torch.long)
        for row, (entries, seq, p, c) in enumerate(zip(self.sequence_logprobs(seqs, k, temperature), seqs, p_lens,
                                                       c_lens)):
            for j in range(c):
                sampled[row, j] = _logprob(entries[p + j], seq[p + j])
                items = sorted(entries[p + j].items(), key=lambda kv: (kv[1].get("rank") or math.inf,
                                                                       -kv[1]["logprob"]))[:k]
                for r, (token, item) in enumerate(items):
                    logps[row, j, r] = -math.inf if math.isnan(item["logprob"]) else item["logprob"]
                    ids[row, j, r] = int(token)
        device = completion_ids.device
        return sampled.to(device), TopK(logps.to(device), ids.to(device), k)


# --- a local server for tests and CPU smoke runs -------------------------------------------------------

class LocalTeacherServer:
    """vLLM's /v1/completions prompt-log-prob format, served from an in-process HF causal LM on localhost.

        with LocalTeacherServer(model) as server:
            client = TeacherServer(server.url)
    """

    def __init__(self, model, name: str = "local-teacher", host: str = "127.0.0.1", port: int = 0):
        self.model, self.name = model.eval(), name
        self.requests = 0  # completion requests answered (tests: the run used the server)
        self._lock = threading.Lock()  # one forward at a time (torch threads are shared)
        handler = self._handler()
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "LocalTeacherServer":
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="teacher-server", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], k: int, temperature: float) -> list[dict | None]:
        device = next(self.model.parameters()).device
        with self._lock:
            logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0, :-1]
        logp = torch.log_softmax(logits.double() / temperature, dim=-1)
        entries: list[dict | None] = [None]
        for pos, token in enumerate(ids[1:]):
            row = logp[pos]
            chosen = float(row[token])
            entry = {str(token): {"logprob": chosen, "rank": int((row > row[token]).sum()) + 1, "decoded_token": ""}}
            if k:
                values, top = row.topk(k)
                for r, (v, t) in enumerate(zip(values.tolist(), top.tolist())):
                    entry.setdefault(str(t), {"logprob": v, "rank": r + 1, "decoded_token": ""})
            entries.append(entry)
        return entries

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": server.name, "object": "model"}]})
                self._send(404, {"error": f"no route {self.path}"})

            def do_POST(self):
                if self.path.rstrip("/") != "/v1/completions":
                    return self._send(404, {"error": f"no route {self.path}"})
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompts = req.get("prompt")
                if prompts and isinstance(prompts[0], int):
                    prompts = [prompts]
                if not prompts or not all(isinstance(p, list) and p for p in prompts):
                    return self._send(400, {"error": "prompt must be token ids (a list, or a list of lists)"})
                if req.get("model") not in (None, server.name):
                    return self._send(404, {"error": f"model {req.get('model')!r} not served"})
                server.requests += 1
                k, temperature = req.get("prompt_logprobs"), float(req.get("temperature", 1.0))
                choices = []
                for i, ids in enumerate(prompts):
                    entries = None if k is None else server.prompt_logprobs(ids, int(k), temperature or 1.0)
                    choices.append({"index": i, "text": "", "logprobs": None, "finish_reason": "length",
                                    "stop_reason": None, "prompt_logprobs": entries})
                n = sum(len(p) for p in prompts)
                self._send(200, {"id": "cmpl-local", "object": "text_completion", "created": int(time.time()),
                                 "model": server.name, "choices": choices,
                                 "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}})

        return Handler
