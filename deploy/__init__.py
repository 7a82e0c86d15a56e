"""Deployment: the Ray job, its submission, live control, cluster specs and example configs."""
