"""The governor: one authority that decides every delegation and tool call of a session."""
