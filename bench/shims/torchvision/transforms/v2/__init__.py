"""Imported by transformers (image processors) once it sees a torchvision; the script loads no image processor."""
