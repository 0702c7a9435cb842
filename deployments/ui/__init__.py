"""The Gradio chat page (page.py): its deployment, its per-session state (chat_state.py) and its
rate limit (page_limit.py)."""
