"""The benchmarks run in CI at a tiny size, so that they cannot rot; what they check against
(the dense RegMean reference) must agree with the merge."""

from many_cli.bench.e2e import bench_e2e
from many_cli.bench.merge_bench import Shape, bench_merge


def test_bench_merge_agrees_with_dense_regmean_at_a_tiny_size(tmp_path):
    result = bench_merge(layers=2, tasks=2, shape=Shape(hidden=64, intermediate=128, rank=4, vision=16),
                         workdir=tmp_path, dense_layers=2)
    assert result.dense_error <= 1e-6
    assert result.adapter_bytes < result.dense_delta_bytes
    assert 0 < result.float32_state_error <= 1e-4
    assert result.float32_state_bytes_per_layer < 0.6 * result.state_bytes_per_layer
    assert list(tmp_path.iterdir()) == []  # the synthetic world is cleaned up


def test_bench_e2e_runs_every_phase_on_the_tiny_family(tmp_path):
    result = bench_e2e("tiny", tasks=2, records=3, new_tokens=2, device="cpu", workdir=tmp_path)
    assert result.stats_tokens > 3 * 10  # three records of image tokens and text
    assert result.stats_loop_seconds > 0 and result.forward_seconds > 0 and result.merge_seconds > 0
    assert result.infer_base_seconds > 0 and result.infer_many_seconds > 0
    assert min(result.stats_peak_host, result.merge_peak_host, result.infer_peak_host) > 50e6  # torch is loaded
    assert result.stats_bytes_per_task > 0 and result.merged_bytes > result.adapter_bytes_per_task
    assert list(tmp_path.iterdir()) == []


def test_the_llava_15_7b_configuration_has_its_published_size():
    import torch
    from transformers import LlavaForConditionalGeneration

    from many_cli.bench.e2e import llava_15_7b

    config, processor = llava_15_7b(None, None)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    assert 7.0e9 < parameters < 7.1e9  # LLaVA-1.5-7B: 7.06 B
    assert len(model.model.language_model.layers) == 32 and config.vision_config.num_hidden_layers == 24
    assert processor.image_processor.crop_size["height"] == 336
