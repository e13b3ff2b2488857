"""scheduler_svc: the public Generation API, admission, the speculation policy and the engine step loop."""
