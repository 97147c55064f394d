"""train.py's support code, one job a module: config and options, planning, data, the optimizer and loss, the
steps of an epoch, the clock, checkpoints, outputs, torchrun, and runs of several networks (members, folds)."""
