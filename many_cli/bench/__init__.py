"""Benchmarks and the synthetic inputs they run on."""
