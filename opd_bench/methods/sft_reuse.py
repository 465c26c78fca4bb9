"""The iso-cost control that costs no new data: spend the budget on more epochs of pi_sft's own SFT data.

The student continues SFT, from pi_sft, on exactly the teacher samples pi_sft was trained on (the world's
sft-data stage: already paid for when the world was built, so nothing is charged but the training itself),
with the preset's shared learning rate and batch size, until the budget stops it. Beside `sft-continue`
(fresh teacher samples, their sampling charged) it separates "more SFT helps because pi_sft was not
converged on its data" from "more SFT helps because the data is new". If this wins, pi_sft was not
converged and the benchmark measures its training schedule, not the methods.
"""

from pydantic import Field

from opd_bench.errors import UserError
from opd_bench.methods.base import Method, Params, register


class SFTReuseParams(Params):
    rows: int | None = Field(None, gt=0)
    """train on the first N rows of pi_sft's SFT data only (None: all of it); fewer rows, more epochs per budget"""


class SFTReuse(Method):
    name = "sft-reuse"
    paper = "the iso-cost control (no paper runs it: GKD, MiniLLM and DistiLLM stop SFT at a fixed dataset)"
    rule = "the same budget on more epochs of pi_sft's own SFT data (already paid: nothing new is sampled)"
    Params = SFTReuseParams

    def sft_rows(self, ctx, p):
        """pi_sft's SFT data (prompt and completion columns), the first `rows` of it when set."""
        from pathlib import Path

        from opd_bench.micro.world import load_sft_data

        folder = getattr(ctx.world, "sft_data", None)
        if not folder:
            raise UserError(f"{self.name} trains on pi_sft's own SFT data, which this world does not provide "
                            f"(world.kind={ctx.cfg.world.kind}: only the micro world builds its SFT data here)")
        data = load_sft_data(Path(folder))
        if p.rows is not None:
            if p.rows > len(data):
                raise UserError(f"{self.name}: method.params.rows={p.rows}, but pi_sft's SFT data has "
                                f"{len(data)} rows")
            data = data.select(range(p.rows))
        return data

    def trainer(self, ctx, p):
        from opd_bench.sft import continued_sft_trainer, tokenize_pairs

        data = self.sft_rows(ctx, p)  # nothing charged: the world's build paid for these samples
        return continued_sft_trainer(ctx, tokenize_pairs(ctx.tokenizer, data["prompt"], data["completion"]))


register(SFTReuse())
