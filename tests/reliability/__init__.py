"""Reliability tests: bad inputs and faults, each met by a clear error and nothing lost."""
