"""Model families, one module each, behind the interface in `base`."""

from loraflow.families.base import Cond, Family
from loraflow.families.flux import Flux
from loraflow.families.sana import Sana
from loraflow.families.sd import StableDiffusion
from loraflow.families.sd3 import StableDiffusion3
from loraflow.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {
    f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux(), Sana())
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"model.family: unknown family {name!r}; known: {', '.join(FAMILIES)}") from None


__all__ = ["Cond", "Family", "FAMILIES", "get_family"]
