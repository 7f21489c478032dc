"""Next-step category prediction (Table 2): task, ranking metrics, predictors, registry."""
from dennl_jax.recsys.task import (NextStepTask, check_task, dominant_set, dominant_target, evaluated,
                                   history_features, history_length, interacted_target,
                                   last_steps, make_task, make_tasks, target_strengths,
                                   training_task)
