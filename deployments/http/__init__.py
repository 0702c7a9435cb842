"""The OpenAI-compatible HTTP API: the ingress deployment (ingress.py), its FastAPI routes (api.py),
request bodies, response objects and SSE, errors, the OpenAPI document, the Responses API and
tool calls read out of replies."""
