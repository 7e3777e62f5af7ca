"""Elastic layer kinds: one module each (attention, gated MLP, relu2 MLP, Mamba-2, MoE).

Every layer takes the forward's segments (``models/routing.py``): the normed input of each
segment, and returns each kept segment's output at the segment's width.
"""
