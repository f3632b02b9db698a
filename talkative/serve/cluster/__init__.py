"""The Ray Serve backend (`BACKEND=ray`): the only package that imports ray.

`pools.py` reads the worker pools from model_groups.json (no ray), `runner.py` is today's engine inside one worker
replica (no ray: a scheduler over one `LocalWorker`), `replica.py` wraps it as the worker deployment, `dispatch.py`
is the ingress side of the worker seam (a `Worker` per group and the `RemoteKind` that runs every job whole on a
replica, sent again when its replica dies), `transport.py` its Serve handles, `wiring.py` what the composition root
builds for this backend, `ingress.py` the FastAPI app as the ingress deployment, and `deploy.py` starts or joins the
cluster and deploys both; `shared_limits.py` and `metrics_board.py` count rate limits and metrics across ingress
replicas. The data path is drawn in docs/architecture.md.
"""
