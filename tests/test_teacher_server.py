"""The teacher server client against a localhost stdlib server speaking vLLM's /v1/completions prompt-log-prob
format, backed by a tiny random Qwen3: the round trip equals the in-process scorer (completion_logps)."""

import math
import socket

import pytest
import torch

from opd_bench.errors import UserError
from opd_bench.logprobs import completion_logps
from opd_bench.teacher_server import (LocalTeacherServer, TeacherServer, charged_devices, device_seconds)


@pytest.fixture(scope="module")
def teacher():
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(teacher):
    with LocalTeacherServer(teacher) as srv:
        yield srv


def batch(pad: int = 0):
    """Three rows as TRL pads them: prompts on the left, completions on the right (one completion empty)."""
    g = torch.Generator().manual_seed(1)
    p_lens, c_lens = [5, 2, 7], [6, 0, 3]
    P, C = max(p_lens), max(c_lens)
    prompt_ids = torch.full((3, P), pad, dtype=torch.long)
    prompt_mask = torch.zeros((3, P), dtype=torch.long)
    completion_ids = torch.full((3, C), pad, dtype=torch.long)
    completion_mask = torch.zeros((3, C), dtype=torch.long)
    for i, (p, c) in enumerate(zip(p_lens, c_lens)):
        prompt_ids[i, P - p:] = torch.randint(1, 64, (p,), generator=g)
        prompt_mask[i, P - p:] = 1
        completion_ids[i, :c] = torch.randint(1, 64, (c,), generator=g)
        completion_mask[i, :c] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_round_trip_equals_in_process_logps(teacher, server, temperature):
    b = batch()
    client = TeacherServer(server.url, chunk_size=2)  # two requests, answered in parallel
    remote = client.completion_logps(*b, temperature=temperature)
    local = completion_logps(teacher, *b, temperature=temperature)
    assert remote.shape == local.shape == b[2].shape
    assert remote.dtype == torch.float32
    assert torch.allclose(remote, local.float(), atol=1e-5, rtol=0), (remote - local).abs().max()
    assert (remote[~b[3].bool()] == 0).all()  # padding and the empty completion are 0, as in-process
    assert client.model == "local-teacher"


def test_topk_is_the_teachers_distribution_marked_approximate(teacher, server):
    b = batch()
    top = TeacherServer(server.url).completion_topk(*b, k=4)
    assert top.approximate and "top-4" in top.note
    assert top.logps.shape == (*b[2].shape, 4)
    # Row 0's completion, position j: the teacher's own top-4 at the position predicting completion token j.
    p = int(b[1][0].sum())
    ids = torch.cat([b[0][0, -p:], b[2][0, :6]])[None]
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=ids).logits[0].double(), -1)[p - 1:p - 1 + 6]
    values, tokens = logp.topk(4)
    assert torch.allclose(top.logps[0, :6].double(), values, atol=1e-6)
    assert torch.equal(top.ids[0, :6], tokens)
    assert (top.logps[0].exp().sum(-1) <= 1 + 1e-6).all()  # a part of the mass: the approximation
    assert torch.isinf(top.logps[1]).all()  # the empty completion stays padding


def test_request_format_is_vllms(server, monkeypatch):
    """The payload is vLLM's: token-id prompts, max_tokens 1, prompt_logprobs k (TRL's get_sequence_logprobs)."""
    sent = []
    client = TeacherServer(server.url)
    real = client._request

    def spy(path, payload=None):
        sent.append((path, payload))
        return real(path, payload)

    monkeypatch.setattr(client, "_request", spy)
    client.completion_logps(*batch())
    path, payload = sent[-1]
    assert path == "/v1/completions"
    assert payload["max_tokens"] == 1 and payload["prompt_logprobs"] == 0 and payload["temperature"] == 1.0
    assert all(isinstance(seq, list) and all(isinstance(t, int) for t in seq) for seq in payload["prompt"])
    assert [len(seq) for seq in payload["prompt"]] == [5 + 6, 2 + 0, 7 + 3]  # padding stripped


def test_unreachable_server_is_one_clear_line():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = TeacherServer(f"http://127.0.0.1:{port}/v1", model="m", retries=0, timeout=5)
    with pytest.raises(UserError, match="cannot reach the teacher server"):
        client.completion_logps(*batch())


def test_server_gpus_are_charged():
    assert charged_devices(4, 4) == 8
    assert device_seconds(3600.0, 4, 4) == 8 * 3600.0
    assert device_seconds(10.0, 2) == 20.0
    assert not math.isnan(device_seconds(0.0, 1, 0))
