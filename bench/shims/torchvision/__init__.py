"""A stand-in for torchvision, for bench/train.py's run of diffusers' train_text_to_image_lora.py only.

torchvision from PyPI does not import beside this torch (2.13.0), and the script needs nothing of it
but a few PIL-image transforms (`torchvision.transforms`). This package is put on that script's
PYTHONPATH by the bench and nowhere else; loraflow never imports it.
"""
__version__ = "0.28.0"  # what transformers reads to pick code paths; the torchvision release beside torch 2.13
