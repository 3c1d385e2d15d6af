from flows.finetune import finetune

__all__ = ["finetune"]
