"""`import tasks` registers the built-in datasets' SeqIO tasks and mixtures.

The registrations live in `dsbs_jax.tasks` (see there), the path to use where a
top-level `tasks` may collide (t5x ships its own `t5x/tasks.py`).
"""

from dsbs_jax.tasks import register_dataset

__all__ = ["register_dataset"]
