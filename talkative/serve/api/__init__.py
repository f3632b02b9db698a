"""HTTP and WebSocket routes; everything they do goes through `talkative.serve.service.Service`."""
