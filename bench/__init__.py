"""pyreplica benchmark: `make bench` / `make bench-quick` (python -m bench.run [--quick]); see bench/run.py."""
