"""Workers: one per tensor-parallel rank, each executing the broadcast step plan."""
