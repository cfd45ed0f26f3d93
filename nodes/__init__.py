"""ComfyUI glue for Kosmos-G (V3 node API). The model code lives in ../kosmosg_core.

One registration list, `NODES` (each class names its node id). Ids, input names and socket types are stable forever
(saved workflows refer to them); add deprecated aliases instead of renaming.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .conditioning_files import KosmosGLoadConditioning, KosmosGSaveConditioning
from .encode import KosmosGEncode
from .loader import KosmosGConvertCheckpoint, KosmosGLoader
from .official_sd15 import KosmosGCheckpointSD15
from .paths import register_folders
from .prompt import KosmosGInterleavedPrompt
from .sampling import KosmosGOfficialNoise, KosmosGOfficialSampler

register_folders()

NODES: list[type[io.ComfyNode]] = [
    KosmosGLoader,
    KosmosGInterleavedPrompt,
    KosmosGEncode,
    KosmosGSaveConditioning,
    KosmosGLoadConditioning,
    KosmosGConvertCheckpoint,
    KosmosGOfficialSampler,
    KosmosGOfficialNoise,
    KosmosGCheckpointSD15,
]


class KosmosGExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> KosmosGExtension:
    return KosmosGExtension()


__all__ = ["NODES", "KosmosGExtension", "comfy_entrypoint"]
