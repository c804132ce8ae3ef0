"""The pluggable strategies, each registered by explicit name. Never imports ``agent``."""
