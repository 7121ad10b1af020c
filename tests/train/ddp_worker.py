"""One rank of the DDP test: ``torchrun --nproc_per_node 2 ddp_worker.py IMAGES OUT``.

Trains the tiny config with gloo on CPU, then saves this rank's weights (student,
projectors, discriminator) so the test can check that every rank holds the same model.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from retrofit_agent.train.distributed import init_distributed, shutdown  # noqa: E402
from retrofit_agent.train.engine import Distiller  # noqa: E402
from train_helpers import tiny_config  # noqa: E402

images, out = sys.argv[1], Path(sys.argv[2])
cfg = tiny_config(out, [images], optim={"max_steps": 6}, data={"batch_size": 16}, run={"log_every": 1, "device": "cpu"})
env = init_distributed("cpu")
assert env.world == 2, env
d = Distiller(cfg, env)
summary = d.fit()
state = {
    **{f"student.{k}": v for k, v in d.student.state_dict().items()},
    **{f"projectors.{k}": v for k, v in d.loss.state_dict().items()},
    **{f"discriminator.{k}": v for k, v in d.disc.state_dict().items()},
}
torch.save(state, out / f"rank-{env.rank}.pt")
shutdown()
