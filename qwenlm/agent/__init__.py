"""Agents: ReAct and native function calling over a tool registry; a sandboxed code interpreter."""
