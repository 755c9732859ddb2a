"""Benchmarks of treewatch against reference tools (`make bench`); see docs/benchmarks.md."""
