"""What the front ends and the LLM replicas agree on: the calls (messages.py), what a generation
streams back (replies.py), the one error type and its OpenAI body (errors.py), runtime adapters (runtime_adapters.py), the application's args
(settings.py). Imports only engine/; nothing here imports another deployments package."""
