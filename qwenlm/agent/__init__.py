"""Agents: ReAct and native function calling over a registry of tools, and a sandboxed code interpreter."""
