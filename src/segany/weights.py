"""Known checkpoints. Sizes and MD5s are the publishers' own figures (the hex suffix of each SAM file
name is the start of its MD5); ``segany download`` checks every hash an entry carries."""

from __future__ import annotations

from segany.registry import WeightsInfo, register_weights

_SAM = "https://dl.fbaipublicfiles.com/segment_anything/"

register_weights(WeightsInfo(
    name="sam_vit_h", model="vit_h", url=_SAM + "sam_vit_h_4b8939.pth", filename="sam_vit_h_4b8939.pth",
    size=2564550879, md5="4b8939a88964f0f4ff5f5b2642c598a6", description="Official SAM ViT-H",
))
register_weights(WeightsInfo(
    name="sam_vit_l", model="vit_l", url=_SAM + "sam_vit_l_0b3195.pth", filename="sam_vit_l_0b3195.pth",
    size=1249524607, md5="0b3195507c641ddb6910d2bb5adee89c", description="Official SAM ViT-L",
))
register_weights(WeightsInfo(
    name="sam_vit_b", model="vit_b", url=_SAM + "sam_vit_b_01ec64.pth", filename="sam_vit_b_01ec64.pth",
    size=375042383, md5="01ec64d29a2fca3f0661936605ae66f8", description="Official SAM ViT-B",
))
register_weights(WeightsInfo(
    name="mobile_sam", model="vit_t",
    url="https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
    filename="mobile_sam.pt", layout="mobile_sam", description="MobileSAM (TinyViT encoder)",
))
register_weights(WeightsInfo(
    name="segany_tiny", model="segany_tiny", url="", filename="segany_tiny.pt", layout="segany",
    description="segany's own light model, shipped in the package (segany/assets/weights/)",
))

# CLIP text encoders for text prompts (issue 10). OpenAI publishes each file under its sha256.
_CLIP = "https://openaipublic.azureedge.net/clip/models/"
register_weights(WeightsInfo(
    name="clip_vit_b32_openai", model="clip_vit_b32", layout="openai_clip", filename="clip_ViT-B-32.pt",
    url=_CLIP + "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    sha256="40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    description="OpenAI CLIP ViT-B/32 (text prompts: segany[text])",
))
register_weights(WeightsInfo(
    name="clip_vit_l14_openai", model="clip_vit_l14", layout="openai_clip", filename="clip_ViT-L-14.pt",
    url=_CLIP + "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    description="OpenAI CLIP ViT-L/14 (text prompts: segany[text])",
))
