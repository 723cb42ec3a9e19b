"""gRPC transport: servicers, codec, status mapping, side HTTP listener."""
