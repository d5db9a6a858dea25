"""The embedded demo: a tiny Qwen3.5 hybrid checkpoint that counts, and two adapters that change how.

Made by `scripts/make_demo.py`; see README.md beside this file.
"""

from pathlib import Path

from hylo.demo.tasks import expected_continuation, prompt_for

HERE = Path(__file__).parent
BASE_DIR = HERE / "base"
ADAPTER_DIRS = {"down": HERE / "adapters" / "down", "twos": HERE / "adapters" / "twos"}
DEMO_PROMPTS = [prompt_for(7), prompt_for(23), prompt_for(41)]

__all__ = ["BASE_DIR", "ADAPTER_DIRS", "DEMO_PROMPTS", "expected_continuation", "prompt_for"]
