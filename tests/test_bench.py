"""The benchmarks run in CI at a tiny size, so that they cannot rot; what they check against
(the dense RegMean reference) must agree with the merge."""

from many_cli.bench.merge_bench import Shape, bench_merge


def test_bench_merge_agrees_with_dense_regmean_at_a_tiny_size(tmp_path):
    result = bench_merge(layers=2, tasks=2, shape=Shape(hidden=64, intermediate=128, rank=4, vision=16),
                         workdir=tmp_path, dense_layers=2)
    assert result.dense_error <= 1e-6
    assert result.adapter_bytes < result.dense_delta_bytes
    assert 0 < result.float32_state_error <= 1e-4
    assert result.float32_state_bytes_per_layer < 0.6 * result.state_bytes_per_layer
    assert list(tmp_path.iterdir()) == []  # the synthetic world is cleaned up
