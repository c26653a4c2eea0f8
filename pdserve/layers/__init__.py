"""Model building blocks: tensor-parallel linears, rotary, norms, attention, sampler."""
