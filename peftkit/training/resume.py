"""Saving and restoring a :class:`~peftkit.training.trainer.Trainer`'s whole state in a checkpoint.

What goes in (see :mod:`peftkit.training.checkpoint` for the folder layout): the trainable tensors
and the optimiser state (:class:`~peftkit.training.update.ParameterUpdate`), the schedule, the
trainer's counters (stop requests included), every process's RNG states, the callbacks' states,
and adapters' training-only tensors (AdaLoRA's allocator). Tensors are restored onto the devices
of this run's parameters, so a checkpoint written on a GPU resumes on the CPU and the other way.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from peftkit.data.experts import ExpertData
from peftkit.data.pipeline import TokenizedData
from peftkit.training import checkpoint as ckpt

if TYPE_CHECKING:
    from peftkit.training.trainer import Trainer


def save_trainer_checkpoint(trainer: Trainer) -> Path | None:
    """Write the whole training state (rank 0); every process then hears ``on_checkpoint``."""
    if trainer.checkpoint_root is None:
        return None
    rng = trainer.dist.gather(ckpt.capture_rng())
    path = trainer.checkpoint_root / ckpt.checkpoint_name(trainer.state.step)
    if trainer.dist.is_main:
        update_meta, tensors = trainer.update.state()
        for rank, (_, rng_tensors) in enumerate(rng):
            tensors.update({f"rng/rank{rank}/{k}": v for k, v in rng_tensors.items()})
        for name, adapter in trainer.model.adapters.items():
            if hasattr(adapter, "training_state_dict"):
                tensors.update({f"adapter/{name}/{k}": v for k, v in adapter.training_state_dict().items()})
        meta = {
            "trainer": trainer.state.to_dict(),
            **update_meta,
            "rng": [states for states, _ in rng],
            "callbacks": trainer.callbacks.state_dict(),
            "param_names": [n for n, _ in trainer.params],
            "world_size": trainer.dist.world_size,
            "resumable_data": isinstance(trainer.data, TokenizedData | ExpertData),
        }
        ckpt.write_checkpoint(
            trainer.checkpoint_root,
            trainer.state.step,
            model=trainer.model,
            meta=meta,
            tensors=tensors,
            config_text=trainer.config_text,
            keep=trainer.config.keep_checkpoints,
        )
    trainer.dist.barrier()
    trainer.state.last_checkpoint = path
    trainer.callbacks.on_checkpoint(trainer.state, path)
    return path


def load_trainer_checkpoint(trainer: Trainer, path: str | Path) -> None:
    """Restore everything :func:`save_trainer_checkpoint` wrote; the next step is the one after it."""
    saved = ckpt.read_checkpoint(path)
    meta = saved.meta
    if meta["world_size"] != trainer.dist.world_size:
        raise ValueError(
            f"{path} was written by {meta['world_size']} process(es); resume it with the same number "
            f"(this run has {trainer.dist.world_size})"
        )
    if not meta["resumable_data"] or not isinstance(trainer.data, TokenizedData | ExpertData):
        raise ValueError(f"{path}: resuming needs a data pipeline with a saved position (TokenizedData)")
    trainer.update.load_state(meta, saved.tensors)
    for name, adapter in trainer.model.adapters.items():
        if hasattr(adapter, "load_training_state_dict"):
            adapter.load_training_state_dict(_under(saved.tensors, f"adapter/{name}/"))
    schedule = trainer.update.schedule_state()
    if meta["schedule"] != schedule:
        warnings.warn(
            f"resuming with a different learning-rate schedule: the checkpoint's was {meta['schedule']}, "
            f"this run's is {schedule} (the config changed)",
            UserWarning,
            stacklevel=3,
        )
    trainer.state.load_dict(meta["trainer"])
    trainer.callbacks.load_state_dict(meta["callbacks"])
    trainer.state.last_checkpoint = Path(path)
    trainer.metrics.truncate_after(trainer.state.step)
    rank = trainer.dist.rank
    ckpt.restore_rng(meta["rng"][rank], _under(saved.tensors, f"rng/rank{rank}/"))


def _under(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
