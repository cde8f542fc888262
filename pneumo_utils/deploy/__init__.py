"""Using a trained model: the `predict` command, exports to LiteRT, ONNX and SavedModel
(`export`), and running an export without TensorFlow (`runtime`)."""
