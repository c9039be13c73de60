"""Grafana dashboards: finding them and the data-source definition, and pushing both to a
Grafana server (``agentgov dashboards push``)."""
