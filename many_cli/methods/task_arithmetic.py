"""`task-arithmetic`: the tasks' LoRA updates summed, λ Σ_i s_i B_i A_i, stacked exactly."""

from many_cli.methods.registry import MergeMethod


def task_arithmetic(a_blocks, b_blocks, options, tasks: int):
    from many_cli import lpm

    return lpm.stack_factors(a_blocks, b_blocks, [options.scale] * len(a_blocks))


METHOD = MergeMethod(name="task-arithmetic", title="task arithmetic", reads=(), runner="factors", rule=task_arithmetic)
