"""Candidate trees of a speculative round: build them from the draft's per-depth logits, and accept from them.

tree.py          best-first tree from one draft pass (heap build; the reference)
tree_tensors.py  the same build and the greedy walk as fixed-shape tensor programs (CUDA graphs)
accept.py        greedy and sampling acceptance walks, SamplingConfig
"""
