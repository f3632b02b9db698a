"""What the server tells its operators: metrics, structured logs, request ids, and machine figures."""
