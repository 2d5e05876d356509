"""`ties`: TIES on the dense task vectors (trim to the largest `--density` fraction, elect each
entry's sign, average the agreeing ones; a task that does not adapt a module contributes zeros,
which TIES ignores), factored back to rank Σ r_i by truncated SVD."""

from many_cli.methods.registry import MergeMethod


def ties(a_blocks, b_blocks, options, tasks: int):
    """(A, B, relative Frobenius error of the factorization)."""
    from many_cli import lpm

    merged = options.scale * lpm.ties([b @ a for a, b in zip(a_blocks, b_blocks)], options.density)
    return lpm.low_rank_factors(merged, sum(block.shape[0] for block in a_blocks))


METHOD = MergeMethod(
    name="ties",
    title="TIES",
    reads=("density",),
    runner="factors",
    card_lines=lambda options: [f"- TIES density: {options.density:g}"],
    rule=ties,
    dense=True,
)
