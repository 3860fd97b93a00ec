"""The `conveyor` command line (`conveyor serve`, `conveyor generate`, `conveyor hash-key`).

This package only parses flags and wires `engine/` and `server/` together; nothing in either of
them imports it."""
