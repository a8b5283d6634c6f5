"""The bundled DeepSeek-V4-Flash engine: C++/CUDA sources (csrc/), their build (build.py) and ctypes bindings."""
