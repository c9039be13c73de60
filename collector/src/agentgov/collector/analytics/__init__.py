"""Governance analytics over ClickHouse: sessions, delegation graphs, audit trails, fan-out."""

from agentgov.collector.analytics.queries import Analytics, SessionNotFound

__all__ = ["Analytics", "SessionNotFound"]
