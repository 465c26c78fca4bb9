"""The control: spend the same budget on more SFT instead of OPD.

Teacher A answers fresh training prompts (at the SFT data's temperature; this sampling is charged),
and the student continues SFT on them with the preset's shared learning rate and batch size. If this
wins, the SFT student was not converged and the benchmark measures nothing.
"""

from opd_bench.methods.base import Method, register


class SFTContinue(Method):
    name = "sft-continue"
    paper = "the iso-cost control (no paper runs it: Thinking Machines extrapolates its SFT curve)"
    rule = "the same budget on more SFT, on fresh samples of the consistent teacher (their sampling charged)"

    def trainer(self, ctx, p):
        from opd_bench import offline
        from opd_bench.sft import continued_sft_trainer, tokenize_pairs

        prompts = ctx.prompts(ctx.cfg.train.sft_prompts, "sft-continue")
        folder, cost = offline.build_teacher_samples(ctx.cfg, ctx.teacher, ctx.world.tokenizer, prompts)
        ctx.charge(cost)
        data = offline.load_samples(folder)
        return continued_sft_trainer(ctx, tokenize_pairs(ctx.tokenizer, data["prompt"], data["completion"]))


register(SFTContinue())
