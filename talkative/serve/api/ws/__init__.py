"""The WebSocket API: its protocol (one JSON message per frame) and the hub that fans job events out to connections."""
