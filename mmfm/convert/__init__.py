"""Conversion to and from other formats: Hugging Face transformers (Llama, Mistral, Qwen2)."""
