"""Losses outside the model: chunked target log-probs, LM/SFT sums, DPO-family preference losses (torch only)."""
