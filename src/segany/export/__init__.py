"""Exporters: ONNX graphs of the encoder and decoder (see :mod:`segany.export.onnx`)."""
