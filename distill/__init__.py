"""distill: offline LLM knowledge distillation with sparse teacher targets.

Data path: dataset -> teacher -> targets -> shards (+ manifest) -> storage -> cache -> student.
"""

__version__ = "0.1.0"
