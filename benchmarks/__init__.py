"""mtpf benchmarks."""
