"""Storage: the ClickHouse schema, the span writer and crash repair."""
