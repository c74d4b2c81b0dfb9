"""KubeTune benchmarks: `python -m bench.run_cpu` (CPU set), `python -m bench.gpu` (GPU machines)."""
