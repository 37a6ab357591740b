"""Loading a timm backbone's weights offline, and a clear error for a name timm does not know.

Two offline sources (see "Backbones" in docs/configuration.md): a state-dict file
(``model.backbone.weights_file``, through timm's ``pretrained_cfg_overlay``), or the local Hugging
Face cache as timm fills it (``model.backbone.cache_dir``, else ``$HF_HUB_CACHE``).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm

from lightning_mtl.errors import ConfigError


class hub_offline:
    """Within the block, huggingface_hub answers from its local cache only (no retries).

    ``HF_HUB_OFFLINE=1`` set before the process starts does the same for the whole process;
    this switches the flag the hub library reads at call time, for the model creation only.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.saved: bool | None = None

    def __enter__(self) -> None:
        if not self.enabled:
            return
        from huggingface_hub import constants

        self.saved = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            from huggingface_hub import constants

            constants.HF_HUB_OFFLINE = self.saved


def missing_weights_message(
    name: str, cache_dir: str | None, offline: bool, error: Exception
) -> str:
    """What to do when timm finds no weights for ``name``: the hub repository and the cache
    folder it looked in, and the two ways to provide them."""
    from huggingface_hub import constants

    try:
        config = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # a model timm has no pretrained config for
        config = None
    repo = getattr(config, "hf_hub_id", None) or f"timm/{name}"
    file = getattr(config, "hf_hub_filename", None) or "model.safetensors"
    where = str(Path(cache_dir).expanduser()) if cache_dir else constants.HF_HUB_CACHE
    folder = "models--" + repo.replace("/", "--")
    asked = (
        "the hub is not asked (model.backbone.offline=true)"
        if offline
        else "the hub could not be reached (or HF_HUB_OFFLINE is set)"
    )
    cache_flag = f" --cache-dir {cache_dir}" if cache_dir else ""
    return (
        f"model.backbone.pretrained=true: no weights for {name!r} (Hugging Face repository "
        f"{repo}) in the cache {where} (expected {folder}/snapshots/<commit>/{file}) "
        f"and {asked}. Either fill the cache on a machine with internet "
        f"(`hf download {repo} {file}{cache_flag}`, or "
        f"timm.create_model({name!r}, pretrained=True)) and copy its {folder} folder into {where}; "
        "or "
        "pass model.backbone.weights_file=/path/to/model.safetensors (or .pth). "
        f"({type(error).__name__}: {error})"
    )


def check_backbone_name(name: str) -> None:
    """Fail early, with close matches, on a name timm does not know."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ConfigError(
        f"model.backbone.name={name!r} is not a timm model.{hint} "
        "Accepted values: any name in timm.list_models() (e.g. resnet18, convnext_atto, "
        "efficientnet_b0, vit_tiny_patch16_224)."
    )
