"""Pure-PyTorch twins of every kernel: the CPU path, the test oracle, the benchmark baseline."""
