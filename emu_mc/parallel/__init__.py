"""Parallel plumbing: process groups, the CPU compatibility layer for megatron-core."""
