"""The benchmarks run in CI at a tiny size, so that they cannot rot; what they check against
(the dense RegMean reference) must agree with the merge."""

import pytest
import torch

from many_cli.bench.e2e import bench_e2e
from many_cli.bench.merge_bench import Shape, bench_merge


@pytest.mark.slow
def test_bench_merge_agrees_with_dense_regmean_at_a_tiny_size(tmp_path):
    result = bench_merge(
        layers=2, tasks=2, shape=Shape(hidden=64, intermediate=128, rank=4, vision=16), workdir=tmp_path, dense_layers=2
    )
    assert result.dense_error <= 1e-6
    # The whole process holds the merge (timings are `many bench`'s to report, not a test's to judge).
    assert result.process_seconds > result.merge_seconds
    assert result.adapter_bytes < result.dense_delta_bytes
    assert 0 < result.float32_state_error <= 1e-4
    assert result.float32_state_bytes_per_layer < 0.6 * result.state_bytes_per_layer
    assert list(tmp_path.iterdir()) == []  # the synthetic world is cleaned up


@pytest.mark.slow
def test_bench_e2e_runs_every_phase_on_the_tiny_family(tmp_path):
    result = bench_e2e("tiny", tasks=2, records=3, new_tokens=2, device="cpu", workdir=tmp_path)
    assert result.stats_tokens > 3 * 10  # three records of image tokens and text
    assert min(result.stats_peak_host, result.merge_peak_host, result.infer_peak_host) > 50e6  # torch is loaded
    assert result.merged_bytes > result.adapter_bytes_per_task  # the merge holds every task's projector
    assert list(tmp_path.iterdir()) == []


def test_bench_one_pass_runs_today_s_job_and_the_walk_on_the_tiny_family(tmp_path):
    from many_cli.bench.one_pass_bench import bench_one_pass

    result = bench_one_pass("tiny", tasks=1, records=1, device="cpu", workdir=tmp_path)
    assert result.layers == 1 and result.tasks == 1
    assert min(result.stats_peak, result.merge_peak, result.one_pass_peak, result.spilled_peak) > 50e6  # torch
    assert result.seconds_ratio > 0 and result.peak_ratio > 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "family, published, layers, vision_layers",
    [("llava-1.5-7b", 7_063_427_072, 32, 24), ("qwen2.5-vl-7b", 8_292_166_656, 28, 32)],
)
def test_the_e2e_configurations_have_their_published_sizes(family, published, layers, vision_layers):
    import torch
    from transformers import AutoModelForImageTextToText

    from many_cli.bench.e2e import FAMILIES, vision_depth

    build, _ = FAMILIES[family]
    config, _ = build(None, None)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    # The published checkpoints' parameter counts (model cards: 7.06 B, 8.29 B).
    assert sum(parameter.numel() for parameter in model.parameters()) == published
    assert config.get_text_config().num_hidden_layers == layers
    assert vision_depth(config) == vision_layers


def test_bench_base_check_writes_the_sharded_base_it_times(tmp_path, monkeypatch):
    """A small base cut into several shards, every parameter written once, then checked and loaded."""
    from transformers import LlavaForConditionalGeneration

    from many_cli.bench import base_check
    from many_cli.bench.tiny import clip_vit_l_336, tiny_llava_config

    monkeypatch.setattr(base_check, "SHARD_BYTES", 4 << 20)
    result = base_check.bench_base_check(tmp_path, layers=2, hidden=256, intermediate=512, vision_layers=1)
    config = tiny_llava_config(hidden=256, layers=2, intermediate=512, heads=2, kv_heads=2, vision=clip_vit_l_336(1))
    with torch.device("meta"):
        parameters = sum(t.numel() for t in LlavaForConditionalGeneration(config).state_dict().values())
    assert result.weight_bytes == 2 * parameters  # bfloat16
    assert result.shards == len(list((tmp_path / "base").glob("model-*.safetensors"))) > 1


def test_bench_sample_keeps_the_libraries_bars_and_notices_out(tmp_path, monkeypatch, capsys):
    """transformers' progress bars and warnings, as training the sample raises them, do not reach
    the terminal: `many bench sample` prints its one line."""
    from helpers import run_cli_output
    from transformers.utils import logging as transformers_logging

    import many_cli.bench.sample

    def noisy(out, force):
        transformers_logging.get_logger("transformers.modeling_utils").warning("a notice users cannot act on")
        for _ in transformers_logging.tqdm(range(3), desc="Loading weights"):
            pass
        return out

    transformers_logging.set_verbosity_warning()  # as a fresh process starts (other tests quieted it)
    transformers_logging.enable_progress_bar()
    monkeypatch.setattr(many_cli.bench.sample, "write_sample", noisy)
    code, out, err = run_cli_output(capsys, "bench", "sample", "--out", str(tmp_path / "sample"))
    assert code == 0, err
    assert out == "" and err.strip() == f"wrote {tmp_path / 'sample'}", (out, err)
