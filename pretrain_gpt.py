"""Pretrain a GPT: `torchrun --nproc-per-node 1 pretrain_gpt.py --model tiny` (or plain `python`);
`--dry-run [--world-size N] [--gpu H100]` checks and describes the run without starting it."""
from __future__ import annotations

import os
import sys

from megatron_lite.config import ConfigError, TrainingError
from megatron_lite.parallel_state import destroy_model_parallel
from megatron_lite.training.arguments import parse_run
from megatron_lite.training.dry_run import dry_run
from megatron_lite.training.loop import pretrain


def main(argv: list[str] | None = None) -> int:
    try:
        launch, config = parse_run(argv)
        if launch.dry_run:
            report = dry_run(config, launch)
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank checks, one reports
                print("\n".join(report), flush=True)
            return 0
        pretrain(config)
    except (ConfigError, TrainingError) as exc:
        # Raised on every rank alike (the same flags, the same agreed numbers): every rank
        # reports and exits, nothing hangs. Bad input exits 2, a run that cannot go on 1.
        # One write (print makes two): the lines of ranks that share a pipe stay whole.
        sys.stderr.write(f"pretrain_gpt.py: error: {exc}\n")
        sys.stderr.flush()
        destroy_model_parallel(wait_for_peers=False)
        return 2 if isinstance(exc, ConfigError) else 1
    except BaseException:
        destroy_model_parallel(wait_for_peers=False)
        raise
    # Torn down explicitly, after every rank is done: see destroy_model_parallel.
    destroy_model_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
