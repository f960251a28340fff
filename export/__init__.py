"""Model export: torch backbones -> ONNX files the daemon runs. The only package that imports torch."""
