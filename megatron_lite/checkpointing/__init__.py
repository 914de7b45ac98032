"""Checkpoints: iter_NNNNNNN/ directories plus a marker naming the latest, as Megatron lays them out.

    SAVE_DIR/
      latest_checkpointed_iteration.txt    the iteration number, written last
      iter_0000100/
        manifest.json                      every file's size and CRC-32 (manifest.py)
        ...                                the files of its format

Two formats, Megatron's names (--ckpt-format). torch_dist, the default (torch_dist.py): every
rank writes its own pieces of the weights and Adam state by global offset through
torch.distributed.checkpoint, and a load at any layout reads only its own pieces. torch, the
legacy one: mp_rank_TT[_PPP]/model_optim_rng.pt, one file per (tp, pp) shard written by the
first data-parallel replica (its shard: model, optimizer, iteration, consumed samples, RNG
state, config and layout), plus distrib_optim_DDD.pt per data-parallel rank with the
distributed optimizer; another layout loads it through full tensors (reshard.py). --load
reads either, whichever the directory holds.

Saving (save.py): into iter_N.tmp, then manifest, rename into place, marker, so a crash or a
failed write never damages the previous checkpoint or moves the marker; optionally in the
background. Loading (load.py): the files are checked against the manifest first; the model
arguments the user left unset come from the checkpoint; torch.load(weights_only=True), so a
checkpoint holds only tensors and plain containers, never code. A checkpoint without
optimizer state (`finetune`, as written by tools/convert_checkpoint.py from-hf) starts
training at iteration 0.
"""
from megatron_lite.checkpointing.load import (
                                              adopt_checkpoint_model_args,
                                              load_checkpoint,
                                              load_file,
                                              read_checkpoint,
                                              read_common,
                                              resolve_load,
                                              saved_config,
                                              saved_weights,
)
from megatron_lite.checkpointing.paths import MARKER, checkpoint_dir, first_file, latest_iteration
from megatron_lite.checkpointing.save import CheckpointWriter, PendingSave, save_checkpoint, start_save

__all__ = ["MARKER", "CheckpointWriter", "PendingSave", "adopt_checkpoint_model_args", "checkpoint_dir", "first_file",
           "latest_iteration", "load_checkpoint", "load_file", "read_checkpoint", "read_common", "resolve_load",
           "save_checkpoint", "saved_config", "saved_weights", "start_save"]
