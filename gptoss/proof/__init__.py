"""The proof: prompts, comparisons into parity CSVs, tolerances and the gate."""
