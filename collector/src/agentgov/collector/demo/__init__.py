"""The demo: "clean up old deployments", delegated across processes, traced end to end."""
