"""Alert rules evaluated in real time: they stop sessions and notify Slack."""
