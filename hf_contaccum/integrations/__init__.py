"""hf_contaccum in the trainers: ContAccumTrainer (transformers), the sentence-transformers losses, and the one
step lifecycle both use (ContAccumCallback). Built on hf_contaccum.core; nothing in the core imports this."""
