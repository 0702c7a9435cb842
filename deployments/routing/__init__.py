"""Where calls to the LLM deployment go and how many replicas it runs: Serve's request router
(router.py) over plain placement rules (placement.py, prefix_keys.py), and the autoscaling policy
(autoscaling_policy.py). Imports nothing from this project but itself: Serve loads these modules
in its controller and in every process that holds a handle."""
