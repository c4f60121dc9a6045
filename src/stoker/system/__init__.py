"""Reads the machine and nothing else: CPU and memory budgets, /proc and cgroups, CUDA, start methods.

Every function here takes the root of ``/proc`` and ``/sys`` (and the environment) as parameters
with real defaults, so tests build any machine in a temp folder. Nothing here decides a loader
setting (that is ``stoker.plan``) or starts a process.
"""
