"""mmkernels.distributed: see docs/ and DESIGN.md (filled in as the stacks land)."""
