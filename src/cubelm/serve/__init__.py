"""The OpenAI-compatible service (``cubelm serve``): FastAPI routes over ``AsyncLLM``, with API keys, rate limits,
admission control, streaming, Prometheus metrics and a graceful drain.

Modules: ``protocol`` (wire format), ``app`` (routes, lifecycle state), ``serving`` (requests to the engine and
back), ``streaming`` (SSE, disconnects), ``auth``, ``ratelimit`` + ``buckets``, ``metrics``, ``server`` (uvicorn,
SIGTERM drain), ``commands`` (the CLI verb).
"""
