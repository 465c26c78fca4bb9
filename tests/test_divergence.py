"""signals.generalized_jsd (the full-kl arm's beta, dagger-sft's forward KL) against an explicit numpy formula and
against TRL's chunked divergence kernel, for beta 0 (forward KL), 0.3 (a generalized JSD) and 1 (reverse KL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd_bench import signals as S


def _numpy_jsd(s: np.ndarray, t: np.ndarray, beta: float) -> np.ndarray:
    ps = np.exp(s - s.max(-1, keepdims=True))
    ps /= ps.sum(-1, keepdims=True)
    pt = np.exp(t - t.max(-1, keepdims=True))
    pt /= pt.sum(-1, keepdims=True)
    if beta == 1:
        return (ps * np.log(ps / pt)).sum(-1)
    if beta == 0:
        return (pt * np.log(pt / ps)).sum(-1)
    m = (1 - beta) * ps + beta * pt  # TRL's mixture
    return beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_generalized_jsd_matches_the_formula_and_trls_kernel(beta):
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    ht, wt = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    ours = S.generalized_jsd(hs @ ws.T, ht @ wt.T, beta)
    np.testing.assert_allclose(ours.numpy(), _numpy_jsd((hs @ ws.T).numpy(), (ht @ wt.T).numpy(), beta), rtol=1e-12)
    trl, _ = ChunkedDivergenceFunction.apply(hs.float(), ws.float(), None, ht.float(), wt.float(), None, beta, 1.0)
    np.testing.assert_allclose(ours.numpy(), trl.double().numpy(), rtol=1e-5, atol=1e-6)
    assert (ours > 0).all()
    if beta not in (0.0, 1.0):  # a near miss (the mixture weights swapped) is told apart
        swapped = _numpy_jsd((hs @ ws.T).numpy(), (ht @ wt.T).numpy(), 1 - beta)
        assert np.abs(ours.numpy() - swapped).max() > 1e-3
