"""Using a trained model: the `predict` command, exports to LiteRT, ONNX and SavedModel
(`export`); running an export without TensorFlow is `model.inference`."""
