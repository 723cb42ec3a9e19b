"""The grpc-web edge: Envoy's config generated from Settings, and a supervisor that runs it."""
