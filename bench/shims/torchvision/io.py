"""Imported by transformers (video_utils) once it sees a torchvision; used only to decode videos, never here."""
