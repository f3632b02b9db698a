"""Wires security, limits and observability into an app, in two calls from `create_app`.

`install(app, settings)` runs when the app is built: it decides the access policy (a bad `API_KEYS` stops the
server here, with a message that names no key), creates the per-app rate limiter and metrics, and adds the
middleware, outermost first: request context (request id, HTTP metrics, access log), CORS (so that even a refusal
carries CORS headers and a page of an allowed origin can read why it was refused), then the guard.
`attach(app, service)` runs in the lifespan, before the service starts: it gives the scheduler the per-client
cap and the metrics monitor, and puts the metrics' event sink in front of the WebSocket hub.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..observability.metrics import Metrics, RequestContext, TelemetrySink
from ..service import Service
from ..settings import Settings
from .middleware import Guard
from .policy import AccessPolicy
from .ratelimit import RateLimiter

log = logging.getLogger("talkative.serve")


def install(app: FastAPI, settings: Settings) -> AccessPolicy:
    policy = AccessPolicy(settings)
    metrics = Metrics()
    limiter = RateLimiter(settings.rate_limit_per_minute)
    app.state.access_policy = policy
    app.state.metrics = metrics
    app.state.rate_limiter = limiter
    app.add_middleware(
        Guard, policy=policy, limiter=limiter, metrics=metrics, max_body=settings.max_request_bytes
    )
    origins = policy.origins
    app.add_middleware(
        CORSMiddleware,
        allow_origins=origins,
        allow_credentials="*" not in origins,
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["Retry-After", "X-Request-ID"],
    )
    app.add_middleware(RequestContext, metrics=metrics)
    return policy


def attach(app: FastAPI, service: Service) -> None:
    policy: AccessPolicy = app.state.access_policy
    metrics: Metrics = app.state.metrics
    sched = service.scheduler
    sched.client_cap = policy.client_cap
    sched.monitor = metrics
    sched.sink = TelemetrySink(sched.sink, metrics, sched)
    metrics.bind(service)
    log.info("access: %s", policy.describe())
    short = policy.keys.short_keys()
    if short:
        log.warning("API keys shorter than 16 characters (%s): use long random keys", ", ".join(short))
    if policy.check_hosts:
        log.info("serving the host names %s (ALLOWED_HOSTS)", ", ".join(policy.allowed_hosts))
