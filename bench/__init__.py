"""Benchmarks of loraens against the PEFT-sequential way (see bench/bench.py and BENCHMARKS.md)."""
