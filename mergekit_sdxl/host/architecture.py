"""The SDXL architecture for mergekit: four modules, UNet blocks and CLIP layers as layers.

Layers make YAML gradients vary per block the way SDXL block-weight (MBW) users
expect: the UNet has 19 layers (IN00..IN08, M00, OUT00..OUT08, with ``out.`` in
OUT08), CLIP-L 12 and CLIP-G 32 transformer layers; the VAE has none.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Optional

from transformers import PretrainedConfig

from mergekit_sdxl.host.checkpoint import ARCHITECTURE_NAME, MODEL_TYPE
from mergekit_sdxl.host.mergekit_api import ModelArchitecture, ModuleArchitecture, ModuleDefinition, WeightInfo
from mergekit_sdxl.sdxl.keys import POSITION_IDS_KEY
from mergekit_sdxl.sdxl.manifest import COMPONENT_PREFIXES, NUM_LAYERS, OPTIONAL_KEYS, SDXL_KEYS, component_of, layer_of


def _weight(key: str) -> WeightInfo:
    return WeightInfo(
        name=key,
        optional=key in OPTIONAL_KEYS,
        force_dtype="int64" if key == POSITION_IDS_KEY else None,
    )


class SDXLComponentArchitecture(ModuleArchitecture):
    """One SDXL component (unet, clip_l, clip_g, vae).

    Its weights carry their full key names and the module no ``weight_prefix``: mergekit then
    hands every model the same ``WeightInfo`` objects instead of building a prefixed copy per
    model and key (2515 x N objects, most of the planning time at hundreds of LoRAs).
    """

    def __init__(self, component: str):
        self.component = component
        pre: List[WeightInfo] = []
        layers: Dict[int, List[WeightInfo]] = {index: [] for index in range(NUM_LAYERS[component])}
        for key in SDXL_KEYS:
            if component_of(key) != component:
                continue
            placement = layer_of(key)
            if placement is None:
                pre.append(_weight(key))
            else:
                layers[placement[1]].append(_weight(key))
        self._pre = pre
        self._layers = layers

    def pre_weights(self, config: PretrainedConfig) -> List[WeightInfo]:
        return list(self._pre)

    def post_weights(self, config: PretrainedConfig) -> List[WeightInfo]:
        return []

    def layer_weights(self, index: int, config: PretrainedConfig) -> Optional[List[WeightInfo]]:
        return list(self._layers[index])

    def num_layers_config_key(self) -> str:
        # Fixed by SDXL itself; nothing to write back into the output config.
        return ""

    def num_layers(self, config: PretrainedConfig) -> int:
        return NUM_LAYERS[self.component]


@lru_cache(maxsize=1)
def sdxl_architecture() -> ModelArchitecture:
    """The mergekit ``ModelArchitecture`` for SDXL single-file checkpoints."""
    return ModelArchitecture(
        modules={name: ModuleDefinition(architecture=SDXLComponentArchitecture(name)) for name in COMPONENT_PREFIXES},
        architectures=[ARCHITECTURE_NAME],
        model_type=MODEL_TYPE,
    )


def is_sdxl_architecture(arch: ModelArchitecture) -> bool:
    """True for the architecture of SDXL single-file checkpoints."""
    return ARCHITECTURE_NAME in arch.architectures
