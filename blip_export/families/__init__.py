"""Model families: one folder each (config, reference modules, graph wrappers and their I/O table,
bundle contents, calibration workload). The core names no family."""
