"""Optional bridges to other tools (each imports its tool lazily; attnkit itself never needs them)."""
