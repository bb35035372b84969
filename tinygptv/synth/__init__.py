"""A deterministic synthetic visual world (shapes, colours, sizes, positions, short words) written as every
training dataset of the four stages in its published layout, plus held-out evaluation sets in the benchmark
layouts, so a nano TinyGPT-V can be trained and evaluated end to end on a CPU.

Entry points: :func:`generate_world` (``tinygptv synth``), :func:`render`, :func:`sample_scene`,
:func:`category_breakdown`.
"""

from tinygptv.synth.evalsets import category_breakdown
from tinygptv.synth.generate import generate_world
from tinygptv.synth.render import render
from tinygptv.synth.world import Scene, sample_scene

__all__ = ["Scene", "category_breakdown", "generate_world", "render", "sample_scene"]
