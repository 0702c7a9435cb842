"""What both front ends (http/, ui/) share: the request path (service.py: limits, the backend's
stream, one finish record), model names (served_models.py), keys and limits (guard.py), the
handle to the LLM deployment (handle.py) and the request log (request_log.py)."""
