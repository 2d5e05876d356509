"""`many infer`: the base model with the merged LoRA (folded into its weights by default) and a
routed projector holding every task's projector (CPM), answering one image or a data set.

The package, one job per module:
- `load`: the merged model (or its experts, or one task's own adapter) and the routed projector;
- `answer`: batched greedy answers, routing and experts' choice per record, the rows they make
  (whose fields `rows` owns).
"""

from many_cli.infer.answer import Prediction, answer, answer_all, choose_adapters, is_predictions_file
from many_cli.infer.load import (
    Answerer,
    MergedModel,
    install_router,
    load_merged,
    load_processor,
    load_routed,
    load_task_adapter,
    merge_fingerprint,
)
from many_cli.options import InferOptions

__all__ = [
    "Answerer",
    "InferOptions",
    "MergedModel",
    "Prediction",
    "answer",
    "answer_all",
    "choose_adapters",
    "install_router",
    "is_predictions_file",
    "load_merged",
    "load_processor",
    "load_routed",
    "load_task_adapter",
    "merge_fingerprint",
]
