"""The parts of the LM policies that stand without a policy: argument checks, mixed precision and memory, LoRA setup,
the LM forwards over episode segments, and the heads (next-token logits, value)."""
