"""`Signals`: the per-token signals of one micro-batch that a method's loss reads (`method.loss(s, params)`).

Each signal is computed on first read, so nothing a method does not read is computed. The student's log-probs carry
the gradient; every other signal is detached. Teacher reads go through the trainer's frozen-model wrapper (`_frozen`,
trainer.py), so sharded teachers score correctly.
"""

from __future__ import annotations

from functools import cached_property

import torch
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

from opd_bench import signals as S
from opd_bench.errors import UserError
from opd_bench.logprobs import head_logits, hidden_states, sampled_logps

ROWS = 2048  # token rows per chunk when the (tokens, V) logits are not materialized at once
REST_FLOOR = 1e-6  # coarse (top-k + rest) distributions: the rest bucket's smallest mass (rounding gives <= 0)


class Signals:
    """Per-token signals of one micro-batch, each computed on first read; all (B, C), aligned with tokens.

    Dense mode keeps the student's (B, C, V) logits (cheap on CPU); chunked mode never materializes them:
    log pS with TRL's chunked kernel, detached signals (entropy, KL) ROWS positions at a time, and the
    trained full-vocab divergence with TRL's chunked divergence kernel on the selected positions only.
    """

    def __init__(self, trainer, student, inputs: dict, num_items: torch.Tensor):
        # trainer: the OPDTrainer (its temperature, chunked mode, cost, models and frozen-model wrapper)
        self.tr, self.student, self.inputs = trainer, student, inputs
        self.num_items = num_items  # the global count of completion tokens (the normalizer of a full batch)
        self.tokens = inputs["completion_ids"]
        self.mask = inputs["completion_mask"].bool()
        self.input_ids = torch.cat([inputs["prompt_ids"], self.tokens], 1)
        self.attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        self.T, self.chunked = trainer.temperature, trainer.chunked
        self.coarse = "teacher_topk_logps" in inputs  # a served teacher's top-k stands for its distribution

    @cached_property
    def _hidden(self) -> torch.Tensor:
        self.tr.cost.train(self.tr.n_student, int(self.attention_mask.sum()))
        return hidden_states(self.student, self.input_ids, self.attention_mask, self.tokens.shape[1])

    @cached_property
    def _logits(self) -> torch.Tensor:  # dense mode only
        return head_logits(self.student, self._hidden, self.T)

    @cached_property
    def _logp_entropy(self):
        if self.chunked:
            return sampled_logps(self.student, self._hidden, self.tokens, self.T, True, self.tr.data.reads.entropy)
        return S.token_logps(self._logits, self.tokens), None

    @property
    def student_logp(self) -> torch.Tensor:
        """log pS(y_t | s_t), with its gradient."""
        return self._logp_entropy[0]

    @cached_property
    def entropy(self) -> torch.Tensor:
        if self.chunked and self._logp_entropy[1] is not None:
            return self._logp_entropy[1]
        return self._per_position(S.entropy, with_teacher=False)

    @cached_property
    def _teacher(self):
        if self.tr.teacher_model is None:
            raise UserError("this method reads the teacher's distribution, but no teacher is loaded (offline)")
        return self.tr.accelerator.unwrap_model(self.tr.teacher_model)

    def _with_teacher(self, fn, *args):
        """fn(teacher, *args) inside the teacher wrapper's forward, without gradient (see the module docstring)."""
        _ = self._teacher  # a clear error when there is none
        return self.tr._frozen(self.tr.teacher_model, fn, *args)

    @cached_property
    def _teacher_hidden(self) -> torch.Tensor:
        self.tr.cost.score(self.tr.n_teacher, int(self.attention_mask.sum()))
        return self._with_teacher(hidden_states, self.input_ids, self.attention_mask, self.tokens.shape[1])

    @cached_property
    def _teacher_logits(self) -> torch.Tensor:  # dense mode only
        return self._with_teacher(head_logits, self._teacher_hidden, self.T)

    # --- a served teacher's top-k: coarse-grained distributions (the k tokens + the rest) -----------------

    @staticmethod
    def _with_rest(top: torch.Tensor) -> torch.Tensor:
        """(..., k) log-probs -> (..., k + 1): the k tokens and one bucket holding the rest of the mass."""
        mass = torch.logsumexp(top, -1).exp().clamp(max=1 - REST_FLOOR)
        return torch.cat([top, torch.log1p(-mass).unsqueeze(-1)], -1)

    @cached_property
    def _coarse_teacher(self) -> torch.Tensor:
        top = self.inputs["teacher_topk_logps"].to(torch.float64 if self.student.dtype == torch.float64 else
                                                    torch.float32)
        out = self._with_rest(top.clamp(min=-1e30))
        return torch.where(self.mask.unsqueeze(-1), out, torch.zeros_like(out))  # padding: finite, masked later

    @cached_property
    def _coarse_student(self) -> torch.Tensor:
        """log pS of the teacher's top-k tokens and of the rest, with the gradient (chunked: ROWS positions at a
        time, each chunk's logits recomputed in the backward instead of kept)."""
        ids = self.inputs["teacher_topk_ids"]
        if not self.chunked:
            top = torch.log_softmax(self._logits, -1).gather(-1, ids)
        else:
            from torch.utils.checkpoint import checkpoint

            def rows(h, i):
                return torch.log_softmax(head_logits(self.student, h, self.T), -1).gather(-1, i)

            hs, flat = self._hidden.flatten(0, 1), ids.flatten(0, 1)
            top = torch.cat([checkpoint(rows, hs[i:i + ROWS], flat[i:i + ROWS], use_reentrant=False)
                             for i in range(0, hs.shape[0], ROWS)]).view(*ids.shape)
        out = self._with_rest(top)
        return torch.where(self.mask.unsqueeze(-1), out, torch.zeros_like(out))

    # --------------------------------------------------------------------------------------------------

    def _per_position(self, fn, with_teacher: bool) -> torch.Tensor:
        """fn(student_logits[, teacher_logits]) at every position, without gradient."""
        if with_teacher and self.coarse:
            _ = self._coarse_student  # built with its graph (a divergence may train on it)
            with torch.no_grad():
                return fn(self._coarse_student.detach(), self._coarse_teacher)
        # Built (and cached) outside no_grad: the loss may later need the student's hidden states with their graph.
        _ = self._hidden if self.chunked else self._logits
        with torch.no_grad():
            if not self.chunked:
                return fn(self._logits.detach(), *([self._teacher_logits] if with_teacher else []))
            hs = self._hidden.detach().flatten(0, 1)
            ht = self._teacher_hidden.flatten(0, 1) if with_teacher else None

            def loop(teacher):
                out = []
                for i in range(0, hs.shape[0], ROWS):
                    args = [head_logits(self.student, hs[i:i + ROWS], self.T)]
                    if teacher is not None:
                        args.append(head_logits(teacher, ht[i:i + ROWS], self.T))
                    out.append(fn(*args))
                return torch.cat(out).view(self.tokens.shape)

            return self._with_teacher(loop) if with_teacher else loop(None)

    @cached_property
    def teacher_logp(self) -> torch.Tensor:
        """log pT(y_t | s_t): precomputed (online scoring or the offline dataset), else from the teacher's forward."""
        if "teacher_logps" in self.inputs:
            return self.inputs["teacher_logps"]
        if not self.chunked:
            return S.token_logps(self._teacher_logits, self.tokens)
        return self._with_teacher(lambda teacher, h: sampled_logps(teacher, h, self.tokens, self.T, True)[0],
                                  self._teacher_hidden)

    @property
    def ref_logp(self) -> torch.Tensor:
        return self.inputs["ref_logps"]

    @property
    def sampler_logp(self) -> torch.Tensor:
        return self.inputs["sampler_logps"]

    @cached_property
    def kl(self) -> torch.Tensor:
        """Full-vocab KL(pS(.|s_t) || pT(.|s_t)), detached (vOPD's V(s_t) = -KL_t, TIP's d_t)."""
        return self._per_position(S.reverse_kl, with_teacher=True)

    def topk_kl(self, k: int) -> torch.Tensor:
        return self._per_position(lambda s, t: S.topk_reverse_kl(s, t, k), with_teacher=True)

    def divergence_on(self, keep: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """The full-vocab divergence (beta 1: KL(pS || pT); 0: KL(pT || pS); else TRL's generalized JSD) at the
        `keep` positions only, one value per kept position, with its gradient to the student. The vocabulary
        projection runs on those rows alone (chunked: TRL's kernel, never a (rows, V) tensor in full)."""
        rows = keep.reshape(-1).nonzero().squeeze(1)
        if self.coarse:
            k1 = self._coarse_teacher.shape[-1]
            return S.generalized_jsd(self._coarse_student.reshape(-1, k1).index_select(0, rows),
                                     self._coarse_teacher.reshape(-1, k1).index_select(0, rows), beta)
        hs = self._hidden.flatten(0, 1).index_select(0, rows)
        ht = self._teacher_hidden.flatten(0, 1).index_select(0, rows)
        if self.chunked:
            (sw, sb), (tw, tb) = _head(self.student), _head(self._teacher)
            div, _ = ChunkedDivergenceFunction.apply(hs, sw, sb, ht.detach(), tw, tb, beta, self.T)
            return div
        teacher = self._with_teacher(head_logits, ht, self.T)
        return S.generalized_jsd(head_logits(self.student, hs, self.T), teacher, beta)


def _head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's weight and bias as plain tensors for TRL's kernels: an FSDP2 DTensor is gathered
    (`full_tensor()`, differentiable: its backward reduce-scatters), as TRL's _chunked_divergence_loss does;
    ZeRO-3's partitioned weights are gathered inside the kernels (maybe_gather_lm_head_ctx)."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias
