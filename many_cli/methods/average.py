"""`average`: the tasks' LoRA updates averaged, λ/n Σ_i s_i B_i A_i (a task that does not adapt
a module counts as zero), stacked exactly."""

from many_cli.methods.registry import MergeMethod


def average(a_blocks, b_blocks, options, tasks: int):
    from many_cli import lpm

    return lpm.stack_factors(a_blocks, b_blocks, [options.scale / tasks] * len(a_blocks))


METHOD = MergeMethod(name="average", title="average", reads=(), runner="factors", rule=average)
