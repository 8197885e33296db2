"""Started by tests/test_eval_scale.py under torchrun: `evaluation.evaluate` with pruning batches of a few images, so
that every rank runs some of them; rank 0 prints the rows and the summary as JSON.

usage: torchrun ... tests/torchrun_evaluate.py MODEL DATA WORK_DIR LIMIT PRUNE_BATCH TASKS
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules, wherever torchrun starts

from zoomvit.evaluation import pruning_pass  # noqa: E402
from zoomvit.evaluation import runner as evaluation  # noqa: E402
from zoomvit.evaluation import work as eval_work  # noqa: E402
from zoomvit.models import load_model  # noqa: E402

model, data, work_dir, limit, batch, tasks = sys.argv[1:]
pruning_pass.PRUNE_BATCH = int(batch)
bundle = load_model(model, "cpu")
with eval_work.distributed(bundle.device):
    result = evaluation.evaluate(
        bundle, data, int(limit), keeps=(0.5,), tasks=tasks.split(","), progress=False, work_dir=work_dir
    )
if result is not None:
    print(json.dumps({"rows": result.rows, "summary": result.summary}))
