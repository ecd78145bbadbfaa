"""The assembly of a run: command line, configuration, builders, recipes and validation."""
