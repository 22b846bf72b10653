"""Batch inference at scale: the same predictions as the local engine, on a Ray cluster.

``pip install medsight[ray]`` adds Ray; nothing here imports it until the Ray engine runs.
"""

from medsight.scale.engine import BatchJob, BatchSummary, RayOptions, run_local, run_ray

__all__ = ["BatchJob", "BatchSummary", "RayOptions", "run_local", "run_ray"]
