"""One process of a 2-process run under torchrun, for tests/test_distributed.py (not a test itself).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py OUT CONFIG_JSON [STOP_AFTER] [float64]

Trains ``TrainConfig(**CONFIG_JSON)`` on conftest's separable set (``n_per_class`` in the JSON, default 8) into OUT, logs every checkpoint
write to OUT/../saves.log as "rank epoch", and writes this process's result to OUT/../rank<R>.json.
Exit code 3: stopped by STOP_AFTER steps (a simulated kill).
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import osteo  # noqa: E402
import osteo.training as T  # noqa: E402
from conftest import make_separable  # noqa: E402

out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
n_per_class = cfg.pop("n_per_class", 8)
stop = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3] != "-" else None
rank = int(os.environ["RANK"])
if "float64" in sys.argv[4:]:
    plain_model, plain_inputs = T.make_model, T.network_inputs
    T.make_model = lambda c: plain_model(c).double()
    T.network_inputs = lambda c, hu: [x.double() for x in plain_inputs(c, hu)]
plain_save = T.save_checkpoint


def logged_save(path, state):
    with open(out.parent / "saves.log", "a") as f:
        f.write(f"{rank} {state['epoch']}\n")
    plain_save(path, state)


T.save_checkpoint = logged_save
data = make_separable(n_per_class=n_per_class)
try:
    res = osteo.train(T.TrainConfig(**cfg), data, out, progress=False, checkpoint_every_s=0, stop_after_steps=stop)
except T.TrainingInterrupted:
    sys.exit(3)
(out.parent / f"rank{rank}.json").write_text(json.dumps(res.__dict__, default=str))
