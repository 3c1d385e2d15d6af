"""A stand-in for torchvision, for bench/train.py's run of diffusers' train_text_to_image_lora.py only.

torchvision from PyPI does not import beside this torch (2.13.0), and the script needs nothing of it
but a few PIL-image transforms (`torchvision.transforms`, as torchvision's PIL path does them). This
package is put on that script's PYTHONPATH by the bench and nowhere else; loraflow never imports it.

transformers imports a few more modules at import time once it finds a torchvision
(`transforms.functional.pil_to_tensor`, `transforms.v2.functional`, `io`) and reads its version; the
script's CLIP tokenizer and text encoder call none of them, so `io` and `v2` are empty: a call into
them would fail loudly (AttributeError), not silently.
"""

__version__ = "0.28.0"  # the torchvision release beside torch 2.13; transformers compares it
