"""The typed run config (YAML with dotted overrides) and the model it describes."""
