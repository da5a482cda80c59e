"""mlkv: Multi-Layer Key-Value sharing for memory-efficient transformer decoding."""

__version__ = "0.1.0"
