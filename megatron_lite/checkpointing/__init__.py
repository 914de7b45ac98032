"""Checkpoints: iter_NNNNNNN/ directories plus a marker naming the latest, as Megatron lays them out.

    SAVE_DIR/
      latest_checkpointed_iteration.txt    the iteration number, written last
      iter_0000100/
        manifest.json                      every file's size and CRC-32 (manifest.py)
        mp_rank_00/model_optim_rng.pt      tp rank 00's shard: model, optimizer, iteration,
        mp_rank_01/model_optim_rng.pt      consumed samples, RNG state, the config and layout
                                           it was saved with, and how to unshard it

One file per tensor-parallel rank (mp_rank_TT_PPP with pipeline stages; Megatron's names),
written by data-parallel rank 0: the other replicas hold the same values. With the
distributed optimizer each data-parallel rank holds different Adam state, so each also writes
distrib_optim_DDD.pt beside it.

Saving (save.py): into iter_N.tmp, then manifest, rename into place, marker, so a crash or a
failed write never damages the previous checkpoint or moves the marker; optionally in the
background. Loading (load.py): the files are checked against the manifest first; the model
arguments the user left unset come from the checkpoint; torch.load(weights_only=True), so a
checkpoint holds only tensors and plain containers, never code. A checkpoint saved under
another layout is resharded on load (reshard.py); one without optimizer state
(`finetune`, as written by tools/convert_checkpoint.py from-hf) starts training at iteration 0.
"""
from megatron_lite.checkpointing.load import (
                                              adopt_checkpoint_model_args,
                                              load_checkpoint,
                                              load_file,
                                              read_checkpoint,
                                              resolve_load,
                                              saved_config,
)
from megatron_lite.checkpointing.paths import MARKER, checkpoint_dir, first_file, latest_iteration
from megatron_lite.checkpointing.save import CheckpointWriter, PendingSave, save_checkpoint, start_save

__all__ = ["MARKER", "CheckpointWriter", "PendingSave", "adopt_checkpoint_model_args", "checkpoint_dir", "first_file",
           "latest_iteration", "load_checkpoint", "load_file", "read_checkpoint", "resolve_load", "save_checkpoint",
           "saved_config", "start_save"]
