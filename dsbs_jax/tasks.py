"""SeqIO registrations of distilling step-by-step for the built-in datasets.

`import dsbs_jax.tasks` registers, for each dataset below, the tasks and mixtures
listed in `dsbs_jax.data.registration` (e.g. `dsbs_cqa_step_by_step`). This is the
module path to give t5x (`MIXTURE_OR_TASK_MODULE = "dsbs_jax.tasks"`): a top-level
`tasks` collides with t5x's own `t5x/tasks.py` when t5x is launched as
`python t5x/train.py`. Registering needs no data; a dataset's cache is read from
`<teacher_cache_root>/<name>/` when a dataset is built. Register your own cache
with `register_dataset("mydata")`.
"""

from dsbs_jax.data.official import DATASETS
from dsbs_jax.data.registration import register_dataset
from dsbs_jax.data.synthetic import DATASET_NAME as SYNTHETIC

for _name, _dataset in DATASETS.items():
    register_dataset(_name, metric=_dataset.metric)
register_dataset(SYNTHETIC, metric="accuracy")

__all__ = ["register_dataset"]
