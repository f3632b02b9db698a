"""Names the cluster's pieces share (no ray import): the Serve application and the ingress deployment."""

APP_NAME = "talkative"
INGRESS_DEPLOYMENT = "ingress"
