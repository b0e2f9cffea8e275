"""What the benchmarks share: their command line, the seed's configuration, units, a model
trained with the trainer's own step, the float32 matmul peak, token batches, JSON results."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from backpack_nb import data, dataset, optim
from backpack_nb.devices import autocast
from backpack_nb.errors import UserError, exit_on_user_error
from backpack_nb.models import BackpackLM
from backpack_nb.models.mixing import distinct_tokens
from backpack_nb.paramfile import read_params_file
from backpack_nb.paths import outputs_root
from backpack_nb.training.step import Batch, optimizer_step

GiB, MiB = 2**30, 2**20
DTYPES = ("float32", "bfloat16", "float16")
TINY = dict(batch_size=2, block_size=32, n_layer=2, n_head=2, n_embd=32, n_senses=4)  # tests
# flags several benchmarks take, by keyword (``compile_cap`` is ``--compile-cap``)
SHARED_FLAGS: dict[str, dict[str, Any]] = {
    "device": {}, "dtype": {"choices": DTYPES}, "threads": {"type": int},
    "compile_cap": {"type": float, "default": 0.0, "metavar": "SECONDS"},
    "budget": {"type": float, "default": 0.0, "metavar": "SECONDS"},
}


def new_parser(name: str, doc: str, **shared: str) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.<name>``: --json, the SHARED_FLAGS in ``shared``."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}",
                                description=doc.split("\n")[0])
    for flag, help in shared.items():
        p.add_argument("--" + flag.replace("_", "-"), help=help, **SHARED_FLAGS[flag])
    p.add_argument("--json", help="where to write the JSON (default outputs/bench/)")
    return p


def run_main(run: Callable[[], dict[str, Any]], fmt: Callable[[Any], str], json_path: str | None,
             section: str) -> None:
    """Run a measurement and print its table and write its JSON; a UserError: one line, exit 2."""
    try:
        result = run()
    except UserError as exc:
        exit_on_user_error(exc)
    print(fmt(result))
    print(f"wrote {write_json(result, json_path, section)}")


def seed_params(config: str = "train_europarl_scratch") -> dict[str, Any]:
    """A params file's values (default the seed's): the shape, batch, dropout and dtype."""
    return read_params_file(config)


def check_device(device: str, dtype: str, compile_cap: float, budget: float) -> None:
    """A UserError for a plan this machine cannot run, or negative seconds."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("no CUDA device here; use --device cpu")
    if dtype == "float16" and not device.startswith("cuda"):
        raise UserError(f"--dtype float16 runs with a gradient scaler on CUDA only; on "
                        f"{device} use --dtype bfloat16 or float32")
    if compile_cap < 0 or budget < 0:
        raise UserError("--compile-cap and --budget are seconds >= 0 (0: none)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Levers:
    """The performance switches a benchmarked model trains with."""

    compile: bool = False
    optimizer: str = "fused"  # "fused" or "foreach" AdamW, or "sparse" (table only)
    dedup: bool = True  # the Backpack's senses once per distinct token
    mixing: str = "sdpa"  # or "einsum" (the Backpack)
    chunked: bool = True  # chunked cross-entropy
    checkpointing: bool = False
    fused_loss: bool = False  # off by default (train.py's too)
    distinct_on_host: bool = False  # likewise (Backpack): distinct tokens found on the host


class Trainee:
    """A model trained with ``levers`` by the trainer's own step over ``batches`` (B, T + 1)."""

    def __init__(self, model: torch.nn.Module, batches: Sequence[torch.Tensor], device: str,
                 dtype: str, levers: Levers, lr: float = 1e-4) -> None:
        self.device, lv = torch.device(device), levers
        # x on the host (its distinct tokens are found there, as the trainer does) and
        # (x, y) contiguous on the device, as a data loader delivers them
        self.host_x = [b[:, :-1].contiguous() for b in batches]
        self.batches = [(x.to(self.device), b[:, 1:].contiguous().to(self.device))
                        for x, b in zip(self.host_x, batches)]
        backpack = isinstance(model, BackpackLM)
        if backpack:
            model.dedup_senses, model.mixing = lv.dedup, lv.mixing
        if lv.checkpointing:
            model.set_activation_checkpointing(True)
        model.fused_loss = lv.fused_loss
        self.model = model.to(self.device).train()
        self.opt = optim.make_optimizer(model, lr=lr, fused=lv.optimizer == "fused",
                                        sparse_table=lv.optimizer == "sparse")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == "float16")
        self.autocast = functools.partial(autocast, self.device, dtype)
        self.compiled, self.forward = lv.compile, torch.compile(model) if lv.compile else model
        self.kwargs = {"chunked_loss": lv.chunked}
        self.distinct_on_host, self.steps = lv.distinct_on_host and backpack, 0

    def _next_batch(self) -> Batch:
        i, self.steps = self.steps % len(self.batches), self.steps + 1
        if not self.distinct_on_host:
            return *self.batches[i], self.kwargs
        distinct = tuple(t.to(self.device) for t in distinct_tokens(self.host_x[i]))
        return *self.batches[i], {**self.kwargs, "distinct": distinct}

    def step(self) -> torch.Tensor:
        """One training step on the next batch; its loss, on the device."""
        return optimizer_step(self.forward, self.opt, self.scaler, self._next_batch,
                              autocast=self.autocast, params=self.model.parameters)[0]


def sync(device: str | torch.device) -> None:
    """Wait for queued CUDA work, so a wall-clock time covers the kernels it launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device) -> tuple[float, Any]:
    """Seconds ``fn()`` takes, the CUDA work it queued included, and what it returned."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def matmul_gflops(n: int = 2048, reps: int = 3, device: str = "cpu") -> float:
    """Best-of-``reps`` GFLOP/s of an n x n float32 matmul: the roofline for MFU here."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    a @ b  # warm-up: the first call pays for the library's set-up
    return 2 * n**3 / min(timed(lambda: a @ b, device)[0] for _ in range(reps)) / 1e9


def zipf_batches(vocab_size: int, batch_size: int, block_size: int, n: int,
                 seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches (B, T + 1) of Zipf(1) token ids, like text: at B*T = 1,024 about 550
    distinct, as in Europarl batches of that size (520-555 measured on the sample)."""
    gen = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    return [torch.multinomial(probs / probs.sum(), batch_size * (block_size + 1),
                              replacement=True, generator=gen).view(batch_size, block_size + 1)
            for _ in range(n)]


def europarl_batches(batch_size: int, block_size: int, n: int, seed: int = 0,
                     langs: Sequence[str] = ("en", "fr")) -> tuple[list[torch.Tensor], int]:
    """``n`` batches of real Europarl text (the sample in ``langs``, prepared into a temporary
    folder) and its compact V. 4 x 256 holds about 530 distinct en+fr tokens, 450 English."""
    if not ((source := default_europarl_source()) / "raw").is_dir():
        raise UserError(f"no Europarl sample at {source}: set EUROPARL_SOURCE")
    with tempfile.TemporaryDirectory() as tmp:
        out = data.prepare(source, Path(tmp) / "ep",
                           data.PrepareConfig(block_size=block_size, langs=tuple(langs)),
                           progress=False)
        vocab = dataset.load_meta(out)["vocab_size"]
        tokens = torch.from_numpy(dataset.load_tokens(out, "train").astype("int64"))
    gen = torch.Generator().manual_seed(seed)
    starts = (torch.randint(0, len(tokens) - block_size - 1, (batch_size,), generator=gen).tolist()
              for _ in range(n))  # one draw a batch
    return [torch.stack([tokens[s:s + block_size + 1] for s in row]) for row in starts], vocab


def default_europarl_source() -> Path:
    """``EUROPARL_SOURCE``, else the sample beside the checkout (``../shared/europarl``)."""
    env = os.environ.get("EUROPARL_SOURCE")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "europarl"


def write_json(result: Any, path: str | None, section: str) -> Path:
    """Write ``result`` to ``path`` (default ``<outputs root>/bench/<section>.json``) atomically."""
    out = Path(path) if path else outputs_root() / "bench" / f"{section}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return out
