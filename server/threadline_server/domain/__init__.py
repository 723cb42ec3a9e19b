"""Domain logic: pure rules over dataclasses and ports; no gRPC, SQL or JWT imports."""
