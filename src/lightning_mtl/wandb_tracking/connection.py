"""How a W&B run starts without a hang or a crash: the mode asked for, whether an API key is
there, the ``init_timeout`` of an online start, and the warning when an offline run cannot keep
checkpoint artifacts."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

log = logging.getLogger(__name__)

OFFLINE_MODES = ("offline", "dryrun")
Mode = Literal["online", "offline", "disabled", "shared"]


def requested_mode(offline: bool, mode: str | None) -> str:
    """The W&B mode asked for: ``offline=True``, else the ``mode`` argument, else
    ``$WANDB_MODE``, else W&B's settings (``wandb offline`` writes one); ``dryrun`` is
    ``offline`` and ``run`` is ``online``."""
    if offline:
        return "offline"
    chosen = mode or os.environ.get("WANDB_MODE")
    if not chosen:
        try:
            from wandb.sdk import wandb_setup

            chosen = wandb_setup.singleton().settings.mode
        except Exception:  # a W&B without this internal: its default
            chosen = "online"
    chosen = str(chosen).lower()
    return {"dryrun": "offline", "run": "online"}.get(chosen, chosen)


def has_credentials() -> bool:
    """Whether W&B finds an API key (``$WANDB_API_KEY``, ``wandb login``'s ``~/.netrc`` entry, an
    identity token, its settings) for the server it talks to, without a prompt or a request."""
    try:
        import wandb
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:
        return _key_in_environment_or_netrc()
    try:
        host = wandb_setup.singleton().settings.base_url
        found = wbauth.authenticate_session(
            host=host, source="lightning-mtl", prompt=False, update_session=False
        )
    except wandb.errors.AuthenticationError:
        return True  # a key that W&B will refuse: wandb.init says why, then the run goes offline
    except (AttributeError, TypeError):  # another W&B version's internals
        return _key_in_environment_or_netrc()
    return found is not None


def _key_in_environment_or_netrc() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        hosts = netrc.netrc(os.environ.get("NETRC")).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def settings_with_timeout(settings: Any, init_timeout: float) -> Any:
    """W&B settings (a ``wandb.Settings``, a mapping or None) with ``init_timeout`` set, unless
    the given settings set it themselves."""
    import wandb

    if settings is None:
        return wandb.Settings(init_timeout=init_timeout)
    if isinstance(settings, Mapping):
        return wandb.Settings(**{"init_timeout": init_timeout, **dict(settings)})
    if "init_timeout" not in settings.model_fields_set:
        settings = settings.model_copy(update={"init_timeout": init_timeout})
    return settings


def refuse_artifacts(log_model: Any, why: str) -> None:
    """Warn that ``log_model`` is turned off because the run is offline (the caller turns it
    off): Lightning would raise instead."""
    log.warning(
        "W&B: logger.wandb.log_model=%r turned off: %s, and checkpoint artifacts need an "
        "online run (the checkpoints stay in <run dir>/checkpoints/)",
        log_model,
        why,
    )
