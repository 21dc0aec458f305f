"""The data path: configuration, checkpoints, input, output, planning and the run itself."""
