"""OTLP receivers: HTTP (``/v1/traces``) and gRPC (``TraceService/Export``)."""
