"""GPU benchmark harness: loraplex vs HF transformers + PEFT on random-weight Llama shapes.

`python -m bench --model 1b|8b [--quick]` writes bench/results/<date>-<device>-<model>.json (and a
plot); `python -m bench.report` rebuilds bench/RESULTS.md from the latest result file per model.
"""
