"""Values and helpers every layer shares: errors, the usage record, usage, SSE, tokens."""
