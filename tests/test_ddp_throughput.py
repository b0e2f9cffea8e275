"""Under DDP the loop does not block the host every step to agree on a stop, and tokens/s is
the wall time between log lines (less evaluation and saving): a rank that waits for a slower
one waits on the clock. Two gloo processes under torchrun; one sleeps *outside* its training
step, where before this change rank 0 waited in an unmeasured all-reduce of the stop flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # trains

SLEEP_S = 0.5  # ten times a step of the small model below, even on a loaded machine
# rank 1 sleeps each iteration before it asks whether to stop (outside the step)
_SLOW_RANK = """
import os, sys, time
sys.path.insert(0, {root!r})
from backpack_nb.training import loop

if os.environ["RANK"] == "1":
    real = loop.Trainer._stop_reason

    def slow(self):
        time.sleep({sleep})
        return real(self)

    loop.Trainer._stop_reason = slow
import train
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_slow_rank_shows_in_rank_0s_tokens_per_second(prepared_europarl, tmp_path):
    script = tmp_path / "slow_rank.py"
    script.write_text(_SLOW_RANK.format(root=str(ROOT), sleep=SLEEP_S))
    out = tmp_path / "ddp"
    argv = ["--config", "tiny_transformer", "--data_dir", "europarl_sample", "--out_dir",
            str(out), "--max_iters", "10", "--eval_interval", "100", "--eval_iters", "1",
            "--checkpoint_interval", "100", "--log_interval", "2", "--n_layer", "1",
            "--n_embd", "32", "--n_head", "2", "--block_size", "32", "--batch_size", "4"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", str(script), *argv], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    tokens_per_iter = info["effective_batch"]["tokens"]
    # every iteration takes at least the sleep, on both ranks: rank 0 waits for rank 1
    bound = tokens_per_iter / SLEEP_S
    assert 0 < info["tokens_per_s"] <= 1.05 * bound, (info["tokens_per_s"], bound)
