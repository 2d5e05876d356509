"""`many`: Low-rank Parameter Merging (the paper's LPM), the least-squares merge of every task's
LoRA under its input covariances, solved one input group at a time (`merge.solve`)."""

from many_cli.methods.registry import MergeMethod


def _card_lines(options) -> list[str]:
    weighting = (
        "balanced (each task divided by its token count)"
        if options.balance
        else "by calibration tokens (plain least squares)"
    )
    lines = [
        f"- ridge ρ: {options.ridge:g} (relative to the mean diagonal of each Gram matrix)",
        f"- weighting: {weighting}",
    ]
    if options.alpha != 1:
        lines.append(f"- off-diagonal reduction α: {options.alpha:g} (RegMean: α C + (1 − α) diag C)")
    if options.one_pass:
        lines.append(
            "- statistics: retaken in one pass through the merged model (--one-pass: each stage's inputs "
            "as the merged stages below give them, RegMean++), not the stats files' own"
        )
    return lines + [f"- merge state stored in {options.state_precision}"]


METHOD = MergeMethod(
    name="many",
    title="least-squares (LPM)",
    reads=("ridge", "balance", "alpha", "state_precision", "one_pass", "walk_memory"),
    runner="lpm",
    card_lines=_card_lines,
    rank_fit="each layer's output space",
)
