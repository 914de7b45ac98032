"""What updates the weights: AdamW over fp32 main weights (optimizer.py), or Muon for the
matrices (muon.py), the learning-rate schedule (lr_schedule.py), global gradient clipping
(clip_grads.py) and fp16's loss scaler (loss_scaler.py). The sharded optimizers build on it in
distributed/."""
