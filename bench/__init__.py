"""``lutc bench``: ONNX Runtime vs stock TVM vs lut-compiler, side by side (see main.py)."""
