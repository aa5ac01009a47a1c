"""Training metrics of both trainers: `<out_dir>/metrics.jsonl` (one JSON record per line) and TensorBoard when a
writer is importable. Only process 0 writes. A resumed run first drops the lines past its checkpoint's step (a
killed run logged them), so the file reads as one uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np


def _tensorboard_writer(folder: Path):
    """tensorboardX's SummaryWriter, else torch's, else None. Imported here: both are optional dependencies."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # noqa: BLE001 — no tensorboard writer installed (or a broken one): skip it
            return None
    return SummaryWriter(str(folder))


class MetricsWriter:
    def __init__(self, out_dir: str | Path, resume_step: int = 0, tensorboard: bool = False):
        out_dir = Path(out_dir)
        self.active = jax.process_index() == 0
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not self.active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:  # a torn last line
                    pass
            self.path.write_text("".join(x + "\n" for x in keep))
        if tensorboard:
            self.tb = _tensorboard_writer(out_dir / "tb")

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k == "step":
                    continue
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
                elif isinstance(v, list):
                    for j, x in enumerate(v):
                        self.tb.add_scalar(f"{k}/{j + 1}", x, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def to_py(metrics: dict) -> dict:
    """Device scalars / vectors → floats / lists (JSON)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else float(a)
    return out


# dense bf16 matmul peak per chip (vendor figures), by a substring of `jax.Device.device_kind`
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12,
              "TPU v6 lite": 918e12, "TPU v4": 275e12}


def peak_flops(device=None) -> float | None:
    """The chip's bf16 matmul peak, None when unknown (CPU): MFU is then not reported."""
    kind = (device or jax.devices()[0]).device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


def throughput(steps: int, seconds: float, tokens_per_step: int, flops_per_step: float, n_devices: int,
               peak: float | None) -> dict:
    """tokens/s, model FLOP/s and (where the chip's peak is known) MFU over `steps` steps in `seconds`."""
    out = dict(steps_per_s=steps / seconds, tokens_per_s=steps * tokens_per_step / seconds,
               model_flops_per_s=steps * flops_per_step / seconds)
    if peak:
        out["mfu"] = out["model_flops_per_s"] / (peak * n_devices)
    return out
