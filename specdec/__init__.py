"""specdec: goodput-driven speculative decoding served as gRPC services."""
