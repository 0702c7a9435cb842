"""The LLM deployment (llm.py: one engine per replica) and what each replica reports to the
routers and the autoscaler (load_report.py)."""
