"""Benchmarks: `python -m hift_rt.bench {kernels,engine,finetune}`."""
