"""Who may call the server: the access policy, the middleware every request passes, and the rate limiter."""
