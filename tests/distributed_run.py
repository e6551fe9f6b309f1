"""Test helper: train.py or continue_train.py, and each rank's final state in a file.

    [torchrun --nproc_per_node N] tests/distributed_run.py OUT_DIR train|continue OPTIONS...

After each training phase every rank writes OUT_DIR/PHASE.rankR.pth (PHASE ``mle``
or ``rl``): the model's weights and the engine's metrics, so that the test can
compare the ranks with each other and with a single-process run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ignite.distributed as idist
import torch

from simple_nmt import cli, runs


def main() -> None:
    out_dir, script, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    fit = runs.fit

    def fit_and_save(engine_class, *args, **kwargs):
        engine = fit(engine_class, *args, **kwargs)
        torch.save({"model": engine.raw_model.state_dict(), "metrics": dict(engine.state.metrics)},
                   out_dir / f"{engine_class.phase}.rank{idist.get_rank()}.pth")
        return engine

    runs.fit = fit_and_save
    {"train": cli.main_train, "continue": cli.main_continue}[script](argv)


if __name__ == "__main__":
    main()
