"""Explaining a model to a reader: Grad-CAM (`gradcam`), figures (`plots`), model cards and
the metrics a notebook writes (`report`)."""
