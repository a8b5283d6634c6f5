"""spark-setup: run DeepSeek-V4-Flash on an NVIDIA DGX Spark with a bundled engine."""

__version__ = "0.1.0"
