"""The training application: the accelerate loop, loss, optimizer, precision, FSDP, stopping, non-finite steps, metrics and trackers."""
