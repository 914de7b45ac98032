"""Optional packages a flag needs: checked with the configuration, so a missing one is refused in
one line on every rank before any work (the metric writers import them only when opened)."""
from __future__ import annotations

import importlib

from megatron_lite.config.checks import ConfigError, flag

# TrainConfig field -> (the module it imports, how to install it).
_PACKAGES = {
    "tensorboard_dir": ("torch.utils.tensorboard", 'pip install tensorboard (or pip install -e ".[tensorboard]")'),
    "wandb_project": ("wandb", "pip install wandb"),
}


def require_packages(cfg: object) -> None:
    """Refuse a writer flag whose package cannot be imported, in one line with the fix; run with
    the other config checks, so every rank stops before any work. `cfg` is a TrainConfig (typed
    loosely: train_config.py imports this module)."""
    for name, (module, install) in _PACKAGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"{flag(name)}={value} needs the {module.split('.')[-1]} package, which cannot be "
                              f"imported ({reason}); install it: {install}") from None
