"""The typed, frozen config model and its strict YAML reader; imports nothing above it."""
